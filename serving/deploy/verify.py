"""Talk to a live model endpoint (:class:`Endpoint`, the deploy side's one HTTP client): which
version it serves, and whether it answers *this* model.

Verification sends fixed rows and compares the answers with the model's own predictions for
them, logged with its training run (``ml.evaluate.verification_rows``): the same rows whenever
and wherever a rollout runs, without loading the model (a version not trained here is verified
on its input example, predicted by a local load). A wrong answer is :class:`VerificationFailed`,
a verdict on the version; no answer is :class:`EndpointUnreachable`, never a verdict (retried).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import httpx
import numpy as np
from tenacity import Retrying, retry_if_exception_type, stop_after_delay, wait_fixed

from serving.deploy.target import EndpointUnreachable, VerificationFailed
from serving.server.contract import SLIM_ATOL, SLIM_RTOL, VERSION_HEADER

if TYPE_CHECKING:
    import pandas as pd

# Per row, |endpoint - expected| <= ATOL + RTOL * max |expected| of the rows: what the server's
# own load check allows a runtime (serving.server.contract: LiteRT on the slim path differs
# from Keras by float32 ulps of the outputs' scale).
ATOL = SLIM_ATOL
RTOL = SLIM_RTOL
# How long verification waits for an endpoint that answers from another version (verify).
SETTLE_S = 30.0


@dataclass(frozen=True)
class Rows:
    """Feature rows to send and the predictions the version itself gives for them."""

    columns: list[str]
    data: list[list[Any]]
    expected: np.ndarray
    source: str

    def payload(self) -> str:
        """``{"dataframe_split": ...}`` with exact floats (repr round-trips) and NaN as null."""
        split = {"columns": self.columns, "data": self.data}
        return json.dumps({"dataframe_split": split}, default=_json_default, allow_nan=False)


class Endpoint:
    """HTTP to one model endpoint (MLflow scoring protocol plus the server's ``/v1/model``).

    ``fresh_connections`` closes the connection after every request, so that behind a
    Service each call may reach another pod (a check must see the new pods, not one
    kept-alive old one).
    """

    def __init__(
        self, base_url: str, *, timeout_s: float = 30.0, fresh_connections: bool = False
    ) -> None:
        self.base = base_url.rstrip("/")
        headers = {"Connection": "close"} if fresh_connections else {}
        self._client = httpx.Client(timeout=timeout_s, headers=headers)

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._client.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            return self._client.request(method, f"{self.base}{path}", **kwargs)
        except httpx.HTTPError as exc:
            raise EndpointUnreachable(f"{method} {self.base}{path} failed: {exc!r}") from exc

    def ping(self) -> bool:
        """``/ping`` answers 200 (the server loaded the model and a warm-up prediction worked)."""
        try:
            return self._request("GET", "/ping").status_code == 200
        except EndpointUnreachable:
            return False

    def served_version(self) -> str | None:
        """The registry version the endpoint reports (``/v1/model``, else the header)."""
        resp = self._request("GET", "/v1/model")
        if resp.status_code == 200:
            try:
                body = resp.json()
            except ValueError:
                body = {}
            if isinstance(body, dict) and body.get("version") is not None:
                return str(body["version"])
        header = resp.headers.get(VERSION_HEADER)
        return header or self._request("GET", "/ping").headers.get(VERSION_HEADER)

    def invoke(self, payload: str) -> httpx.Response:
        """POST a JSON scoring request; any HTTP answer is returned, no answer raises."""
        headers = {"Content-Type": "application/json"}
        return self._request("POST", "/invocations", content=payload, headers=headers)


class _OtherVersion(EndpointUnreachable):
    """The endpoint answers, from another version than the one deployed (not yet, or not)."""


def verify(
    endpoint_url: str,
    version: str,
    rows: Rows,
    *,
    atol: float = ATOL,
    rtol: float = RTOL,
    timeout_s: float = 30.0,
    settle_s: float = SETTLE_S,
) -> dict[str, Any]:
    """Check that ``endpoint_url`` serves ``version`` and answers ``rows`` as it should.

    An endpoint that answers from another version is asked again, on a new connection, for up
    to ``settle_s``: a Service's endpoints follow a completed rollout a moment later (longer
    while Kubernetes' EndpointSlice controller catches up, e.g. after an API server outage).

    Returns ``{"endpoint", "version", "rows", "max_abs_diff", "rows_from"}``. Raises
    :class:`VerificationFailed` naming the status code, or the first mismatching row, and
    :class:`EndpointUnreachable` when nothing answers, or another version still does.
    """

    def ask() -> httpx.Response:
        with Endpoint(endpoint_url, timeout_s=timeout_s) as endpoint:  # its own connection
            served = endpoint.served_version()
            if served != str(version):
                # Not the version's fault: what is behind the endpoint is not what was deployed.
                raise _OtherVersion(
                    f"{endpoint.base} serves version {served or 'unknown'}, expected {version}"
                )
            return endpoint.invoke(rows.payload())  # the same connection: the same server

    resp = Retrying(
        stop=stop_after_delay(settle_s),
        wait=wait_fixed(0.5),
        retry=retry_if_exception_type(_OtherVersion),
        reraise=True,
    )(ask)
    max_abs_diff = check_answer(resp, rows, atol=atol, rtol=rtol, what=f"version {version}")
    return {"endpoint": endpoint_url, "version": str(version), "rows": len(rows.data),
            "max_abs_diff": max_abs_diff, "rows_from": rows.source}  # fmt: skip


def check_answer(
    resp: httpx.Response, rows: Rows, *, atol: float, what: str, rtol: float = RTOL
) -> float:
    """The max abs difference of an ``/invocations`` answer to ``rows``' expected predictions;
    raises :class:`VerificationFailed` with the status code, or the first mismatching row."""
    if resp.status_code != 200:
        sent = f"POST {resp.request.url} with {len(rows.data)} rows ({rows.source})"
        raise VerificationFailed(f"{sent} returned {resp.status_code}: {_excerpt(resp.text)}")
    try:
        body = resp.json()
        remote = as_array(body["predictions"] if isinstance(body, dict) else body)
    except (ValueError, KeyError, TypeError) as exc:
        why = f"unexpected /invocations answer ({exc}): {_excerpt(resp.text)}"
        raise VerificationFailed(why) from exc
    return compare(remote, rows.expected, atol=atol, rtol=rtol, what=what)


def compare(remote: np.ndarray, expected: np.ndarray, *, what: str, atol=ATOL, rtol=RTOL) -> float:
    """Max abs difference; raises :class:`VerificationFailed` at the first row off by more
    than ``atol + rtol * max |expected|`` (the largest finite one)."""
    if remote.shape != expected.shape:
        answered = f"predictions of shape {remote.shape} for {expected.shape[0]} rows"
        raise VerificationFailed(
            f"the endpoint answered {answered}; {what} gives shape {expected.shape}"
        )
    diff = np.abs(remote - expected)
    # NaN on exactly one side is a mismatch; NaN on both sides agrees.
    diff = np.where(np.isnan(remote) & np.isnan(expected), 0.0, diff)
    diff = np.where(np.isnan(diff), np.inf, diff)
    max_abs_diff = float(diff.max()) if diff.size else 0.0
    finite = np.abs(np.nan_to_num(expected, nan=0.0, posinf=0.0, neginf=0.0))
    allowed = atol + rtol * float(np.max(finite, initial=0.0))
    if np.any(diff > allowed):
        bad = np.argwhere(diff > allowed)
        first = tuple(int(i) for i in bad[0])
        raise VerificationFailed(
            f"{len(bad)} of {diff.size} predictions differ from {what}'s by more than "
            f"atol={atol:g} + rtol={rtol:g} x max |expected|; max abs diff {max_abs_diff:.6g}; "
            f"first mismatch at row {first[0]}: "
            f"endpoint {float(remote[first])!r}, expected {float(expected[first])!r}"
        )
    return max_abs_diff


# -- where the rows come from -------------------------------------------------------------------


def load_rows(version: Mapping[str, Any], *, tracking_uri: str) -> Rows:
    """The verification rows of a registered version (a ``VersionInfo.to_dict()``).

    Those logged with its training run when it was evaluated; for a version without them, its
    input example with predictions from a local load of the model.
    """
    from mlflow.artifacts import load_dict
    from mlflow.exceptions import MlflowException

    from ml.evaluate import VERIFICATION_ROWS_ARTIFACT
    from ml.registry import use_mlflow

    use_mlflow(tracking_uri)
    run_id = version.get("run_id")
    if run_id:
        try:
            logged = load_dict(f"runs:/{run_id}/{VERIFICATION_ROWS_ARTIFACT}")
        except (MlflowException, OSError):
            logged = None
        if logged:
            expected = np.asarray(logged["predictions"], dtype="float64")
            columns = [str(c) for c in logged["columns"]]
            return Rows(columns, logged["data"], expected, f"logged with run {run_id}")
    frame, columns = input_example_rows(version["model_uri"])
    return local_rows(version["model_uri"], frame, columns, source="its input example")


def input_example_rows(model_uri: str) -> tuple[pd.DataFrame, list[str]]:
    """The rows a model was logged with (its input example) and its feature columns."""
    import pandas as pd
    from mlflow.models import Model

    model = Model.load(model_uri)
    example = model.load_input_example()
    if example is None:
        raise ValueError(f"{model_uri} has neither verification rows nor an input example")
    frame = example if isinstance(example, pd.DataFrame) else pd.DataFrame(example)
    columns: list[str] = []
    if model.signature is not None and model.signature.inputs is not None:
        columns = [c for c in model.signature.inputs.input_names() if c in frame.columns]
    return frame, columns or [str(c) for c in frame.columns]


def local_rows(model_uri: str, frame: pd.DataFrame, columns: list[str], *, source: str) -> Rows:
    """``frame[columns]`` with predictions from ``mlflow.pyfunc.load_model(model_uri)``."""
    import mlflow.pyfunc

    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"frame lacks feature columns {missing}")
    features = frame[list(columns)]
    if features.empty:
        raise ValueError("verification needs at least one row")
    expected = as_array(mlflow.pyfunc.load_model(model_uri).predict(features))
    data = features.astype(object).where(features.notna(), None).to_numpy().tolist()
    return Rows(columns=[str(c) for c in columns], data=data, expected=expected, source=source)


def verify_endpoint(
    endpoint: str, model_uri: str, frame: pd.DataFrame, feature_columns: list[str], *,
    atol: float = ATOL, rtol: float = RTOL, timeout_s: float = 30,
) -> dict[str, Any]:  # fmt: skip
    """Parity of ``endpoint`` with a local load of ``model_uri`` on ``frame`` (the CLI's check).

    Unlike :func:`verify` it does not ask which version is served: it compares answers only.
    """
    rows = local_rows(model_uri, frame, feature_columns, source="the given rows")
    with Endpoint(endpoint, timeout_s=timeout_s) as client:
        try:
            ping = client._request("GET", "/ping")
        except EndpointUnreachable as exc:
            raise VerificationFailed(f"GET {client.base}/ping failed: {exc}") from exc
        if ping.status_code != 200:
            why = f"returned {ping.status_code}: {_excerpt(ping.text)}"
            raise VerificationFailed(f"GET {client.base}/ping {why}")
        try:
            resp = client.invoke(rows.payload())
        except EndpointUnreachable as exc:
            raise VerificationFailed(str(exc)) from exc
    max_abs_diff = check_answer(resp, rows, atol=atol, rtol=rtol, what=model_uri)
    return {"endpoint": endpoint.rstrip("/"), "rows": len(rows.data), "max_abs_diff": max_abs_diff}


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value
    if hasattr(value, "isoformat"):
        return value.isoformat()
    raise TypeError(f"cannot serialise {type(value).__name__} to JSON")


def as_array(predictions: Any) -> np.ndarray:
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
