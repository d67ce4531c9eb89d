"""The model server's ASGI app (no framework on the hot path): routes, and how a request
is answered. What the server serves and where it differs from MLflow: the package docstring.

``POST /invocations``: the body is read under a size limit and a deadline
(``serving.server.body``). For a Keras network (the fast path, ``serving.server.loader``) a JSON
body is decoded once (``serving.server.jsoncodec``), checked in strict mode
(``serving.server.strict``), read straight into rows (``serving.server.protocol``) and predicted
through the micro-batcher (``serving.server.batching``); the answer is laid out as MLflow's
scoring server lays out that flavor's. For a micro-batched pyfunc, small requests of plain
numbers go straight to a shared predict call (``serving.server.pyfunc_batching``). Anything
else, and everything the fast paths do not recognise with certainty, goes through the reference
path (``serving.server.reference``): MLflow's own parsing and ``PyFuncModel.predict``, so the
fast paths only ever accept what MLflow accepts and answer the same numbers, and every rejection
is MLflow's own decision (same status, same ``error_code``).

The request path itself only appends one tuple per finished request to a list (and the
micro-batcher one reference to each model call's input rows and output array, for the feature
and prediction histograms); access-log lines (``serving.server.logs``) and metric updates
(``serving.server.metrics``) are made from those records in batches
(``serving.server.records``): at least every 0.25 s, every 256 requests, before every
``/metrics`` answer and at shutdown.

At start the model loads in a thread, is warmed up (``serving.server.warmup``) and only then
does ``/ping`` answer 200.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from serving.server.batching import MicroBatcher
from serving.server.body import read_body
from serving.server.compat import mark_serving_environment
from serving.server.config import ServerConfig
from serving.server.contract import (
    REQUEST_ID_HEADER,
    VERSION_HEADER,
    is_numeric_column,
)
from serving.server.jsoncodec import UNDECODED, DecodeError, as_mlflow_reads, dumps, loads
from serving.server.loader import LoadedModel, load_drift_profile, load_model, resolve_identity
from serving.server.logs import AccessLog
from serving.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from serving.server.metrics import ServerMetrics
from serving.server.payload import PayloadLog, accepted_request_id, request_id_factory
from serving.server.protocol import column_rows, fast_rows, tensor_rows
from serving.server.pyfunc_batching import PyfuncBatching, predictions_json, predicts_inline
from serving.server.records import Recorder
from serving.server.reference import observed, reference_invocations
from serving.server.replies import (
    JSON_TYPE,
    Reply,
    RequestError,
    error_reply,
    non_finite_prediction_reply,
    request_error_reply,
)
from serving.server.shadow import mirror_of
from serving.server.strict import StrictInputs, strict_reply
from serving.server.warmup import warm_up

log = logging.getLogger("serving.server")
_perf_counter = time.perf_counter

_FAST_CONTENT_TYPES = frozenset(
    {b"application/json", b"application/json; charset=utf-8", b"application/json;charset=utf-8"}
)
_ROUTES = {
    "/invocations": "/invocations",
    "/ping": "/ping",
    "/health": "/health",
    "/version": "/version",
    "/metrics": "/metrics",
    "/v1/model": "/v1/model",
}
_GET_ROUTES = frozenset({"/ping", "/health", "/version", "/metrics", "/v1/model"})
_METHOD_NOT_ALLOWED = b'{"detail":"Method Not Allowed"}'
_REQUEST_ID = REQUEST_ID_HEADER.lower().encode()


class ScoringApp:
    """Raw ASGI app (no framework on the hot path). One instance per worker process.

    Every finished request is recorded as one tuple, every fast-path model call (and
    reference-path answer) as its ``(rows, predictions)``; the records become access-log lines
    and metric updates in batches (``serving.server.records``).
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
        access = AccessLog(config.access_log, known=(*_ROUTES, "GET", "POST", "HEAD"))
        self.recorder = Recorder(self.metrics, access)
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
        self._observe_columns: tuple[str, ...] = ()
        # The payload log (serving.server.payload), once the model is known and if it is on.
        self.payload_log: PayloadLog | None = None
        self._new_request_id = request_id_factory()
        self._reference_columns: tuple[str, ...] = ()  # what a reference-path answer records

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
        request_id = None
        try:
            if path == "/invocations":
                if method == "POST":
                    request_id = self._request_id(scope)
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
        live, requests = mirror_of(scope["headers"]) if path == "/invocations" else (None, 1)
        mirrored = live is not None
        if mirrored and reply.status == 200:  # a mirrored request: keep both answers
            self.recorder.shadow.append((body, live))
        if reply.content_type is JSON_TYPE and not reply.headers:
            headers = self._json_headers.get(len(body)) or self._headers_for(len(body))
        else:
            headers = (
                (b"content-type", reply.content_type),
                (b"content-length", b"%d" % len(body)),
                *self._common_headers,
                *reply.headers,
            )
        if request_id is not None:
            headers = (*headers, (_REQUEST_ID, request_id))
        await send({"type": "http.response.start", "status": reply.status, "headers": headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
        end = _perf_counter()
        # A shadow's answer to a mirrored request reached no caller: not in the payload log
        # (with the caller's X-Request-Id it would also make the live answer's row ambiguous).
        log_it = reply.answered and not mirrored and self.payload_log is not None
        if log_it and self.payload_log.sampled():
            rows, predictions = reply.answered
            self.payload_log.add(request_id, rows, predictions, end - started, end)
        self.recorder.request_done(
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
                requests,
            ),
            self._loop,
        )

    def _request_id(self, scope) -> bytes:
        """The caller's ``X-Request-Id`` when it is a sane one, else a new one."""
        for name, value in scope["headers"]:
            if name == _REQUEST_ID and accepted_request_id(value):
                return value
        return self._new_request_id()

    def _headers_for(self, length: int) -> tuple[tuple[bytes, bytes], ...]:
        """The response headers of a JSON reply of ``length`` bytes (kept for small sizes)."""
        headers = (
            (b"content-type", JSON_TYPE),
            (b"content-length", b"%d" % length),
            *self._common_headers,
        )
        if length < 4096:
            self._json_headers[length] = headers
        return headers

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
            self.recorder.flush()
            metrics = self.metrics
            # With --workers N, which worker answered (the numbers are the whole server's).
            worker = ((b"x-worker-pid", b"%d" % os.getpid()),) if metrics.multiprocess else ()
            return Reply(200, metrics.render(), METRICS_CONTENT_TYPE.encode(), headers=worker)
        # /v1/model
        if self.model is None:
            return error_reply(503, "TEMPORARILY_UNAVAILABLE", "The model is not loaded yet.")
        return Reply(200, self._model_json)

    # -- POST /invocations --------------------------------------------------------------------

    async def _invocations(self, scope, receive) -> tuple[Reply, int]:
        content_type = content_length = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                content_length = value
        config = self.config
        body = await read_body(
            receive, content_length, config.max_request_bytes, config.body_timeout_s
        )
        if isinstance(body, Reply):
            return body, 0
        if not self.ready:
            reply = error_reply(503, "TEMPORARILY_UNAVAILABLE", "The model is not ready yet.")
            return reply, len(body)
        # A JSON body is decoded once: what a fast path declines goes to the reference path
        # decoded (unless json would read it differently: serving.server.jsoncodec).
        strict = self._strict
        payload = UNDECODED
        batcher = self.batcher
        if batcher is not None and content_type in _FAST_CONTENT_TYPES:
            try:
                payload = loads(body)
            except DecodeError:
                payload = UNDECODED
            if payload is not UNDECODED:
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
                    return request_error_reply(exc), len(body)
                if rows is not None:
                    try:
                        outputs = await batcher.submit(rows)
                    except Exception:
                        log.warning(
                            "fast-path prediction failed; answering through the pyfunc",
                            exc_info=True,
                        )
                    else:
                        reply = self._predictions_reply(outputs)
                        if self.payload_log is not None:
                            reply.answered = (rows, outputs)
                        return reply, len(body)
        elif (
            (shared := self.pyfunc_batching) is not None
            and shared.columns is not None
            and content_type in _FAST_CONTENT_TYPES
        ):
            # the pyfunc's all-double columns: rows straight to the shared call
            try:
                payload = loads(body)
            except DecodeError:
                payload = UNDECODED
            else:
                reply, strict = await self._shared_rows(shared, payload, body, content_type, strict)
                if reply is not None:
                    return reply, len(body)
        reply = await self._reference(body, content_type, strict, as_mlflow_reads(payload, body))
        if reply.observed is not None:
            self.recorder.observed.append(reply.observed)
            rows, predictions = reply.observed
            if self.payload_log is not None and rows is not None and predictions is not None:
                reply.answered = reply.observed
        return reply, len(body)

    async def _shared_rows(
        self,
        shared: PyfuncBatching,
        payload: Any,
        body: bytes,
        content_type: bytes | None,
        strict: StrictInputs | None,
    ) -> tuple[Reply | None, StrictInputs | None]:
        """A small request of plain numbers (``payload``, the decoded ``body``) for a pyfunc of
        ``double`` columns, answered from a shared predict call without MLflow's per-request
        parsing; (None, strict) when MLflow must parse it (strict None: already checked)."""
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
            return Reply(504, b"Request processing time exceeded limit", JSON_TYPE), None
        except Exception:  # the model's own error: answered as MLflow words it
            reply = await self._reference(body, content_type, None, as_mlflow_reads(payload, body))
            return reply, None
        reply = Reply(200, predictions_json(raw), JSON_TYPE, rows=len(rows))
        if self._reference_columns and (seen := observed(None, raw, ())):
            self.recorder.observed.append((rows, seen[1]))
            if self.payload_log is not None and seen[1] is not None:
                reply.answered = (rows, seen[1])
        return reply, None

    def _predictions_reply(self, outputs: np.ndarray) -> Reply:
        values = outputs.tolist()
        if len(values) == 1:
            value = values[0]
            if -math.inf < value < math.inf:
                # = dumps({"predictions": [{name: value}]}) (or [[value]], [value]): the
                # common one-row answer
                body = self._one_prediction + dumps(value) + self._one_prediction_end
                return Reply(200, body, JSON_TYPE, rows=1)
        elif all(map(math.isfinite, values)):
            layout = self._output_layout
            if layout == "records":
                name = self._output_name
                body = dumps({"predictions": [{name: v} for v in values]})
            elif layout == "nested":
                body = dumps({"predictions": [[v] for v in values]})
            else:
                body = dumps({"predictions": values})
            return Reply(200, body, JSON_TYPE, rows=len(values))
        return non_finite_prediction_reply()

    async def _reference(
        self,
        body: bytes,
        content_type: bytes | None,
        inputs: StrictInputs | None,
        payload: Any = UNDECODED,
    ) -> Reply:
        """The reference path, in a worker thread; ``payload``: ``body`` decoded already."""
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
                    observe=self._reference_columns,
                    shared=self.pyfunc_batching,
                    payload=payload,
                ),
                timeout=self.config.request_timeout_s,
            )
        except TimeoutError:
            return Reply(504, b"Request processing time exceeded limit", JSON_TYPE)

    # -- lifecycle ----------------------------------------------------------------------------

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._loop = asyncio.get_running_loop()
                if self.metrics.multiprocess:
                    self.recorder.start_ticking(self._loop)
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
                self.recorder.stop()
                if self.payload_log is not None:  # what it holds is written, its file closed
                    await asyncio.to_thread(self.payload_log.close)
                self.metrics.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _load_and_warm(self) -> None:
        """Runs in a thread: load, warm up, then flip to ready on the event loop."""
        cfg = self.config
        loop = self._loop
        assert loop is not None
        try:
            log.info("loading %s", cfg.model_uri)
            model = load_model(
                cfg.model_uri, fast_path=cfg.fast_path, tf_threads=cfg.tf_threads, slim=cfg.slim
            )
            mark_serving_environment()
            started = time.monotonic()
            batch_key = warm_up(model, pyfunc_batching=cfg.pyfunc_batching)
            # A canary is measured in the buckets of the version it is compared with.
            bins_of = resolve_identity(cfg.profile_from) if cfg.profile_from else model.identity
            profile = load_drift_profile(bins_of)
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
        loop.call_soon_threadsafe(self._set_ready, model, profile, batch_key)

    def _set_ready(
        self,
        model: LoadedModel,
        profile: dict[str, Any] | None = None,
        batch_key: tuple | None = None,
    ) -> None:
        """Serve ``model`` (warmed up): ``profile`` its drift profile (histogram buckets),
        ``batch_key`` the request key of pyfunc micro-batching (None: not batched)."""
        self.model = model
        columns = _input_columns(model)
        self._observe_columns = self.metrics.set_distributions(
            columns, profile, self.config.max_feature_histograms
        )
        self._reference_columns = self._observe_columns
        cfg = self.config
        if cfg.payload_log_path and cfg.payload_log_sample_percent > 0:
            if columns:
                self.payload_log = self.recorder.payload_log = PayloadLog(
                    cfg.payload_log_path,
                    cfg.payload_log_sample_percent,
                    columns,
                    model.identity.version,
                    max_file_mb=cfg.payload_log_max_file_mb,
                    max_day_mb=cfg.payload_log_max_day_mb,
                    counted=self.metrics.count_payload_rows,
                )
                self._reference_columns = tuple(columns)
                log.info(
                    "payload log: %s%% of requests to %s",
                    cfg.payload_log_sample_percent,
                    cfg.payload_log_path,
                )
            else:
                log.warning("payload log off: the model's input schema names no numeric columns")
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
                on_batch=self.recorder.on_batch,
                on_outputs=self.recorder.on_outputs,
            )
        elif getattr(model, "batched_pyfunc", False) and batch_key is not None:
            assert self._loop is not None
            self.pyfunc_batching = PyfuncBatching(
                model,
                batch_key,
                self._loop,
                max_batch_rows=self.config.max_batch_rows,
                max_wait_s=self.config.batch_wait_ms / 1000.0,
                on_batch=self.recorder.on_pyfunc_batch,
                timeout_s=self.config.request_timeout_s,
                inline=predicts_inline(model),
            )
        identity = model.identity
        if identity.version is not None:
            self._common_headers = ((VERSION_HEADER.lower().encode(), identity.version.encode()),)
            self._json_headers = {}
        self._one_prediction, self._one_prediction_end = {
            "records": (b'{"predictions":[{' + dumps(self._output_name) + b":", b"}]}"),
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
    return [s.name for s in schema.inputs if is_numeric_column(s)]
