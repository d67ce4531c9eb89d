"""Prometheus metrics for the model server, kept and exposed with ``prometheus_client``.

The request path does not touch any metric object: it appends one tuple per finished request
to a list (and counts requests in flight in a plain integer), and the server turns those records
into metric updates in batches, every 256 requests or 0.25 s and before every ``/metrics``
answer (:meth:`ServerMetrics.observe_records`, :meth:`ServerMetrics.observe_batches`). A batch
is first summed up in plain dicts (one ``bisect`` per latency), then applied with one ``inc``
per distinct label set and histogram bucket, so a batch of 256 requests costs a few dozen
``prometheus_client`` calls instead of ~700 (each is a lock plus, with several workers, an
mmap write: ~2-4 us). ``prometheus_client`` keeps the values, renders the text exposition
(``generate_latest``) and adds up the workers.

Exposed series (all prefixed ``model_server_``):

- ``requests_total{route,method,status}``         counter (a merged mirror request counts as
  the requests it carries: ``serving.server.shadow.mirror_of``)
- ``request_duration_seconds{route}``              histogram (the same)
- ``requests_in_flight``                           gauge
- ``predictions_total``                            counter: rows answered with a prediction
- ``model_calls_total{path}``                      counter: model calls (``fast``, ``pyfunc``)
- ``batch_rows``                                   histogram: rows per batched model call
- ``batch_requests``                               histogram: requests coalesced per model call
- ``batch_fallbacks_total``                        counter: batches re-run one request at a time
- ``ready``                                        gauge: 1 once the warm-up prediction succeeded
- ``model_info{name,version,uri,flavor,fast_path}`` gauge, always 1 (labels carry the data)
- ``model_version``                                gauge: the registry version served, as a
  number; absent for a model not from the registry (a ``runs:/`` URI, a path, a model id)
- ``model_load_seconds``                           gauge (once the model is loaded)
- ``feature_value{feature}``                       histogram: input values of answered rows
- ``prediction_value``                             histogram: predictions of answered rows
- ``payload_log_rows_total{outcome}``              counter: rows of sampled requests
  ``written`` to the payload log, ``dropped`` (its queue full, or its day's cap reached) or
  ``failed`` (serving.server.payload; only while the log is on)
- ``shadow_abs_diff``                              histogram: per row, |this answer - the live
  version's| for requests mirrored with the live answer (``serving.server.shadow``)
- ``shadow_unpaired_total``                        counter: mirrored requests whose two answers
  did not line up row by row
- ``workers``                                      gauge: live worker processes
- ``start_time_seconds``                           gauge

The two distributions (``feature_value``, ``prediction_value``: every answered row, buckets
from the model's drift profile) are kept by ``serving.server.distributions``.

With ``--workers N`` (several processes behind one port), every worker answers ``/metrics`` for
the whole server through ``prometheus_client``'s multiprocess mode: the parent names the
directory in ``PROMETHEUS_MULTIPROC_DIR`` (a new temporary one, removed at exit, or the one the
variable already names, emptied of old ``*.db`` files first) before the workers start, so each
worker's metric values live in its own memory-mapped files there (``counter_<pid>.db``, ...),
and a ``/metrics`` request in any worker reads every file (``MultiProcessCollector``).
Counters and histograms add up over every worker that ever ran, dead or restarted ones
included (their files stay, so totals never go down); only what a worker recorded but had not
yet turned into metric updates (at most 0.25 s of requests) is lost when it is SIGKILLed.
Gauges count live workers only (``live*`` multiprocess modes): ``requests_in_flight`` is their
sum, ``ready`` their minimum (1 when every live worker is ready), ``model_load_seconds`` and
``model_version`` their maximum, ``start_time_seconds`` the earliest, ``workers`` their number;
``model_info`` appears once per distinct model (so once). A worker removes its live-gauge files
when it stops (``mark_process_dead``), and the answering worker does it for workers that died
without stopping (SIGKILL: the pid no longer runs, or is a zombie). Other workers' numbers can
be up to 0.25 s old; the answering worker writes its own first, so what it shows is what the
files hold afterwards (a later scrape answered by another worker never shows less: counters
never appear to go down between scrapes), and it names itself in an ``X-Worker-Pid`` response
header.
With one worker (the default) the metrics live in memory, in a registry of their own.

The exposition is the text format 0.0.4 (what ``generate_latest`` writes, and the content type
``prometheus_client``'s own handlers send with it), without ``_created`` series.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_PLAIN_0_0_4,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    values,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

from serving.server.distributions import DEFAULT_MAX_FEATURE_HISTOGRAMS, Distributions
from serving.server.shadow import SHADOW_DIFF_BUCKETS, paired_differences

log = logging.getLogger(__name__)

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
MULTIPROCESS_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
MODEL_INFO_LABELS = ("name", "version", "uri", "flavor", "fast_path")

# Request latency: the server answers in ~0.2-5 ms; the long tail is for big or slow models.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
BATCH_REQUEST_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

# One finished request, as the server records it (see ServerMetrics.observe_records):
# (end perf_counter, seconds, method, path, status, bytes_in, bytes_out, client, rows, error_code,
#  requests: 1, or the mirrored requests a merged one carries, contract.MIRRORED_REQUESTS_HEADER)
(R_END, R_SECONDS, R_METHOD, R_PATH, R_STATUS, R_BYTES_IN, R_BYTES_OUT, R_CLIENT, R_ROWS, R_ERROR,
 R_REQUESTS) = range(11)  # fmt: skip

# The server's series were never exposed with ``_created`` samples; the process is the server's.
disable_created_metrics()


class _Tally:
    """Observations of one histogram summed up in plain Python, applied in one go."""

    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf only
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1  # le: value <= bound
        self.total += value

    def apply(self, histogram: Any) -> None:
        """Add to one ``prometheus_client`` histogram (no labels, or one ``.labels()`` child),
        as that many ``observe`` calls would: one ``inc`` per non-empty bucket, one on the sum.

        Uses the child's value slots (``_buckets``, one per upper bound, not cumulative, and
        ``_sum``): ``prometheus_client`` has no public call to add several observations at
        once. tests/serving/server/test_metrics.py checks this against ``observe``."""
        for slot, count in zip(histogram._buckets, self.counts, strict=True):
            if count:
                slot.inc(count)
        histogram._sum.inc(self.total)


def _registry_version(version: str | None) -> float | None:
    """A registry version (``"3"``) as a number; None for anything else."""
    try:
        number = float(version) if version is not None else math.nan
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _alive(pid: int) -> bool:
    """Whether process ``pid`` still runs (a zombie does not)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc (macOS): the pid exists and is ours
        try:
            os.kill(pid, 0)
        except OSError:
            return False
        return True
    return raw[raw.rfind(")") + 2 :][:1] not in ("Z", "X", "x")


def clear_directory(directory: str) -> None:
    """Remove the value files a previous server left in a multiprocess directory."""
    for path in Path(directory).glob("*.db"):
        with contextlib.suppress(OSError):
            path.unlink()


class ServerMetrics:
    """All metrics of one server process. Update from the event loop only.

    ``routes`` maps request paths to their ``route`` label (others are ``"other"``);
    ``multiprocess_dir``: this process is one of several workers, and ``prometheus_client``
    must have been imported with ``PROMETHEUS_MULTIPROC_DIR`` naming that directory (see the
    module docstring); None: this process is the whole server.
    """

    def __init__(
        self, routes: Mapping[str, str] | None = None, multiprocess_dir: str | None = None
    ) -> None:
        self.routes = dict(routes) if routes is not None else {}
        self.multiprocess_dir = multiprocess_dir
        if multiprocess_dir is not None:
            in_mode = getattr(values.ValueClass, "_multiprocess", False)
            if not in_mode or os.environ.get(MULTIPROCESS_DIR_ENV) != multiprocess_dir:
                raise RuntimeError(
                    f"multiprocess metrics need {MULTIPROCESS_DIR_ENV}={multiprocess_dir} in "
                    "the environment before prometheus_client is imported"
                )
            own = None  # values live in the directory's files, not in a registry
            self._exposed = CollectorRegistry(auto_describe=False)
            MultiProcessCollector(self._exposed, path=multiprocess_dir)
        else:
            own = self._exposed = CollectorRegistry(auto_describe=False)
        self._registry = own
        self.pid = os.getpid()
        self.in_flight = 0  # the request path counts here; published to the gauge in batches
        self._ready = 0
        self.started = time.time()

        def counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
            return Counter(f"model_server_{name}", doc, labels, registry=own)

        def histogram(name: str, doc: str, buckets: Sequence[float], labels=()) -> Histogram:
            return Histogram(f"model_server_{name}", doc, labels, registry=own, buckets=buckets)

        def gauge(name: str, doc: str, mode: str, labels: Sequence[str] = ()) -> Gauge:
            return Gauge(f"model_server_{name}", doc, labels, registry=own, multiprocess_mode=mode)

        self._requests = counter(
            "requests",
            "HTTP requests by route, method and status code.",
            ("route", "method", "status"),
        )
        self._latency = histogram(
            "request_duration_seconds",
            "Request latency in seconds by route.",
            LATENCY_BUCKETS,
            ("route",),
        )
        self._in_flight = gauge("requests_in_flight", "Requests being processed now.", "livesum")
        self._predictions = counter("predictions", "Rows answered with a prediction.")
        calls = counter("model_calls", "Model invocations by inference path.", ("path",))
        self._fast_calls = calls.labels(path="fast")
        self._pyfunc_calls = calls.labels(path="pyfunc")
        self._batch_rows = histogram(
            "batch_rows", "Rows per batched model call (micro-batching).", BATCH_ROW_BUCKETS
        )
        self._batch_requests = histogram(
            "batch_requests",
            "Requests coalesced into one fast-path model call.",
            BATCH_REQUEST_BUCKETS,
        )
        self._fallbacks = counter(
            "batch_fallbacks", "Batches whose call failed and were re-run per request."
        )
        self._shadow_diff = histogram(
            "shadow_abs_diff",
            "Per row, |this answer - the live version's answer| to a mirrored request.",
            SHADOW_DIFF_BUCKETS,
        )
        self._shadow_unpaired = counter(
            "shadow_unpaired", "Mirrored requests whose answer did not line up with the live one."
        )
        self._ready_gauge = gauge(
            "ready", "1 once the model is loaded and a warm-up prediction succeeded.", "livemin"
        )
        self._model_info = gauge(
            "model_info", "The served model (labels); always 1.", "livemax", MODEL_INFO_LABELS
        )
        self._load_seconds: Gauge | None = None  # exposed once the model is loaded
        self._version: Gauge | None = None  # exposed for a model from the registry
        # The input and prediction distributions, set once the model is known.
        self._distributions = Distributions()
        if own is not None:
            own.register(self._distributions)  # type: ignore[arg-type]
        workers = gauge("workers", "Live worker processes of this server.", "livesum")
        workers.set(1)
        start = gauge("start_time_seconds", "Unix time the server process started.", "livemin")
        start.set(round(self.started, 3))
        self._payload_rows = counter(
            "payload_log_rows", "Rows of requests sampled for the payload log.", ("outcome",)
        )
        self._request_children: dict[tuple[str, str, int], Any] = {}
        self._latency_children: dict[str, Any] = {}

    @property
    def multiprocess(self) -> bool:
        return self.multiprocess_dir is not None

    # -- updates ----------------------------------------------------------------------------

    @property
    def ready(self) -> int:
        return self._ready

    @ready.setter
    def ready(self, value: int) -> None:
        self._ready = value
        self._ready_gauge.set(value)

    def _request_child(self, key: tuple[str, str, int]) -> Any:
        child = self._request_children.get(key)
        if child is None:
            route, method, status = key
            child = self._request_children[key] = self._requests.labels(route, method, status)
        return child

    def _latency_child(self, route: str) -> Any:
        child = self._latency_children.get(route)
        if child is None:
            child = self._latency_children[route] = self._latency.labels(route)
        return child

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        """One request, counted directly (the server records tuples instead)."""
        self._request_child((route, method, status)).inc()
        self._latency_child(route).observe(seconds)

    def observe_records(self, records: Iterable[Sequence[Any]]) -> None:
        """Count finished requests recorded as tuples (layout: the ``R_*`` indexes)."""
        routes = self.routes
        bounds = LATENCY_BUCKETS
        bisect_left = bisect.bisect_left
        requests: dict[tuple[str, str, int], int] = {}
        latency: dict[str, _Tally] = {}
        predictions = 0
        for record in records:  # _Tally.observe inlined: this loop runs once per request
            route = routes.get(record[R_PATH], "other")
            status = record[R_STATUS]
            key = (route, record[R_METHOD], status)
            n = record[R_REQUESTS]
            requests[key] = requests.get(key, 0) + n
            tally = latency.get(route)
            if tally is None:
                tally = latency[route] = _Tally(bounds)
            seconds = record[R_SECONDS]
            tally.counts[bisect_left(bounds, seconds)] += n
            tally.total += seconds * n
            if status == 200 and record[R_ROWS]:
                predictions += record[R_ROWS]
        for key, count in requests.items():
            self._request_child(key).inc(count)
        for route, tally in latency.items():
            tally.apply(self._latency_child(route))
        if predictions:
            self._predictions.inc(predictions)

    def observe_batches(self, batches: Iterable[tuple[int, int, bool]], fast: bool = True) -> None:
        """Count model calls, as ``(rows, requests, fell_back)`` tuples: the fast path's
        (``fast``), or shared pyfunc calls (their requests count as ``pyfunc`` calls already:
        only the batch histograms and fallbacks)."""
        rows, requests = _Tally(BATCH_ROW_BUCKETS), _Tally(BATCH_REQUEST_BUCKETS)
        calls = fallbacks = 0
        for n_rows, n_requests, fell_back in batches:
            calls += 1
            rows.observe(n_rows)
            requests.observe(n_requests)
            fallbacks += fell_back
        if calls:
            if fast:
                self._fast_calls.inc(calls)
            rows.apply(self._batch_rows)
            requests.apply(self._batch_requests)
        if fallbacks:
            self._fallbacks.inc(fallbacks)

    def observe_shadow(self, pairs: list[tuple[bytes, bytes]]) -> None:
        """Mirrored requests' (own answer, live answer) bodies: their paired differences."""
        diffs, unpaired = paired_differences(pairs)
        if diffs.size:
            tally = _Tally(SHADOW_DIFF_BUCKETS)
            tally.counts = np.bincount(
                np.searchsorted(SHADOW_DIFF_BUCKETS, diffs, side="left"),
                minlength=len(SHADOW_DIFF_BUCKETS) + 1,
            ).tolist()
            tally.total = float(diffs.sum())
            tally.apply(self._shadow_diff)
        if unpaired:
            self._shadow_unpaired.inc(unpaired)

    def count_pyfunc_call(self) -> None:
        self._pyfunc_calls.inc()

    def count_payload_rows(self, outcome: str, rows: int) -> None:
        """From the payload log's writer thread (``prometheus_client`` locks)."""
        self._payload_rows.labels(outcome=outcome).inc(rows)

    def set_distributions(
        self,
        features: Sequence[str],
        profile: Mapping[str, Any] | None = None,
        max_features: int = DEFAULT_MAX_FEATURE_HISTOGRAMS,
    ) -> tuple[str, ...]:
        """Start the feature and prediction histograms (once per process); returns the
        features that have one (:meth:`Distributions.set <serving.server.distributions.
        Distributions.set>`)."""
        return self._distributions.set(features, profile, max_features)

    def observe_rows(self, samples: Iterable[tuple[Any, Any]]) -> None:
        """Answered rows and their predictions (:meth:`Distributions.observe
        <serving.server.distributions.Distributions.observe>`)."""
        self._distributions.observe(samples)

    @property
    def features(self) -> tuple[str, ...] | None:
        """The input columns with a feature histogram (None: not set yet)."""
        return self._distributions.features

    def set_model(self, labels: Mapping[str, str | None], load_seconds: float) -> None:
        """The served model (once per process); ``labels``: :data:`MODEL_INFO_LABELS`."""
        info = {n: "" if labels.get(n) is None else str(labels.get(n)) for n in MODEL_INFO_LABELS}
        self._model_info.labels(**info).set(1)
        version = _registry_version(labels.get("version"))
        if version is not None:
            if self._version is None:
                self._version = Gauge(
                    "model_server_model_version",
                    "The registry version of the served model, as a number.",
                    registry=self._registry,
                    multiprocess_mode="livemax",
                )
            self._version.set(version)
        if self._load_seconds is None:
            self._load_seconds = Gauge(
                "model_server_model_load_seconds",
                "Seconds spent loading and warming the model.",
                registry=self._registry,
                multiprocess_mode="livemax",
            )
        self._load_seconds.set(round(load_seconds, 3))

    def publish(self) -> None:
        """Bring the in-flight gauge and (with several workers) the distributions' files up
        to date (with several workers: for the others)."""
        self._in_flight.set(self.in_flight)
        self._distributions.write()

    def close(self) -> None:
        """At shutdown: not ready; with several workers, no longer counted as live."""
        self.ready = 0
        self.publish()
        if self.multiprocess_dir is not None:
            with contextlib.suppress(OSError):
                mark_process_dead(self.pid, self.multiprocess_dir)

    # -- exposition -------------------------------------------------------------------------

    def render(self) -> bytes:
        """The exposition for the whole server (called while answering ``/metrics``)."""
        self.publish()
        if self.multiprocess_dir is None:
            return generate_latest(self._exposed)
        self._forget_dead_workers()
        try:
            return generate_latest(self._exposed)
        finally:
            # The /metrics request being answered ends right after this.
            self._in_flight.set(max(0, self.in_flight - 1))

    def _forget_dead_workers(self) -> None:
        """``mark_process_dead`` for workers that stopped without doing it (SIGKILL)."""
        assert self.multiprocess_dir is not None
        pids = set()
        for path in Path(self.multiprocess_dir).glob("gauge_live*_*.db"):
            with contextlib.suppress(ValueError):
                pids.add(int(path.stem.rsplit("_", 1)[1]))
        for pid in pids - {self.pid}:
            if not _alive(pid):
                with contextlib.suppress(OSError):  # another worker may be removing them too
                    mark_process_dead(pid, self.multiprocess_dir)
