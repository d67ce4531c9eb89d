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

- ``requests_total{route,method,status}``         counter
- ``request_duration_seconds{route}``              histogram
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
- ``workers``                                      gauge: live worker processes
- ``start_time_seconds``                           gauge

Input and prediction distributions (``feature_value``, ``prediction_value``). Every row the fast
path's model ran on (its calls succeed for whole batches, and the requests in them are
answered), and every row the reference path answered, counts once in the histogram of each of
the model's input columns (the fast path's feature columns, else the input schema's numeric
named columns) and its prediction once in ``prediction_value``: each feature's ``_count`` and
``prediction_value_count`` are the rows predicted. Values that are not finite are not counted (a
generic model's missing values; a fast-path prediction that overflowed float32, which its
request gets a 400 for). Cardinality is bounded: one ``feature`` label value per input column,
the first ``--max-feature-histograms`` (default 32; 0: none) only, a warning naming the others
at start; at most :data:`MAX_HISTOGRAM_BUCKETS` bounds per series. Buckets are fixed when the
model is loaded: the bin edges of the drift profile the pipeline logs with the model's training
run (``drift/profile.json``, the holdout's deciles per column, ``__prediction__`` for the
predictions; ``serving.server.loader.load_drift_profile``), which makes the heatmaps directly
comparable with the drift monitor's bins (its bins put a value equal to an edge above it, a
Prometheus bucket ``le`` at or below it: only values exactly on an edge differ); for a model or
a column without a profile, :data:`GENERIC_VALUE_BUCKETS` (symmetric, roughly logarithmic, from
+-0.1 to +-1000 and 0: a generic model's scale is unknown, and a one-row input example has no
useful quantiles). Each series may thus have its own bounds, which ``prometheus_client``'s
``Histogram`` cannot do: :class:`_Distribution` counts into numpy arrays and exposes standard
``_bucket``/``_count``/``_sum`` series; with several workers it adds its counts to
``prometheus_client``'s own value objects in the worker's files every 0.25 s, where
``MultiProcessCollector`` adds them up like any histogram's. Every worker reads the profile
itself; one that could not (MLflow unreachable at that moment) uses the generic buckets, and the
merged series then has both sets of bounds: counts and sums stay right, the cumulative count at
a bound that only some workers have is too low. Cost: nothing is converted or counted on the
request path. The micro-batcher appends one reference per model call to its input (the float32
matrix or the few rows as lists that the fast path already has, or a shared batch's merged
array) and its output array (the reference path: its parsed frame's columns as float64, made in
its thread, and its predictions); every flush converts what it has at once and counts it with
numpy (one ``searchsorted`` per column, one ``bincount``): ~0.1 ms per flush of 256 single-row
requests at 8 clients (~0.4 us each), no sampling (docs/benchmarks.md).

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
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.utils import floatToGoString

from serving.server.contract import DRIFT_PROFILE_PREDICTION

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

# Input and prediction distributions (see the module docstring).
FEATURE_VALUE = "model_server_feature_value"
PREDICTION_VALUE = "model_server_prediction_value"
# At most this many input columns get a feature histogram (--max-feature-histograms).
DEFAULT_MAX_FEATURE_HISTOGRAMS = 32
# At most this many bucket bounds per histogram (+Inf besides): more edges are thinned evenly.
MAX_HISTOGRAM_BUCKETS = 32
# Buckets of a column the model's drift profile does not cover (or a model without one):
# symmetric, roughly logarithmic, for values of any sign and scale.
GENERIC_VALUE_BUCKETS = (
    -1000.0, -100.0, -10.0, -5.0, -2.0, -1.0, -0.5, -0.1,
    0.0, 0.1, 0.5, 1.0, 2.0, 5.0, 10.0, 100.0, 1000.0,
)  # fmt: skip

# One finished request, as the server records it (see ServerMetrics.observe_records):
# (end perf_counter, seconds, method, path, status, bytes_in, bytes_out, client, rows, error_code)
R_END, R_SECONDS, R_METHOD, R_PATH, R_STATUS, R_BYTES_IN, R_BYTES_OUT, R_CLIENT, R_ROWS, R_ERROR = (
    range(10)
)

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


def bucket_bounds(edges: Any) -> tuple[float, ...] | None:
    """A drift profile column's ``edges`` as histogram bounds: the finite numbers, sorted,
    without duplicates, thinned evenly (first and last kept) to ``MAX_HISTOGRAM_BUCKETS``;
    None when that leaves nothing (or ``edges`` is not a list of numbers)."""
    if not isinstance(edges, list | tuple):
        return None
    try:
        numbers = sorted({float(e) for e in edges if not isinstance(e, bool)})
    except (TypeError, ValueError):
        return None
    bounds = [b for b in numbers if math.isfinite(b)]
    if len(bounds) > MAX_HISTOGRAM_BUCKETS:
        keep = np.unique(np.linspace(0, len(bounds) - 1, MAX_HISTOGRAM_BUCKETS).round().astype(int))
        bounds = [bounds[i] for i in keep.tolist()]
    return tuple(bounds) or None


class _Distribution:
    """One histogram family whose series (one per label value) each have their own fixed
    bounds, fed whole columns of values at once: one ``searchsorted`` per column and one
    ``bincount``, added to numpy arrays (the counts of every bucket of every series, series
    after series, and the sums).

    With one process those arrays are the histogram, and :meth:`collect` exposes it the way
    ``prometheus_client``'s ``Histogram`` does (cumulative ``_bucket``, ``_count``, ``_sum``).
    With several workers they hold what is not yet written, and :meth:`write` (from
    ``ServerMetrics.publish``: every 0.25 s and before every ``/metrics`` answer) adds it to
    ``prometheus_client``'s own value objects (``values.ValueClass``, as its ``Histogram``
    makes them) in the worker's ``histogram_<pid>.db``: one ``inc`` per non-empty bucket and
    per sum a few times a second, not per batch of rows. ``MultiProcessCollector`` then adds
    the workers up and makes the ``_bucket`` series cumulative and ``_count`` like any
    histogram's; it merges per label set, so each series may have its own bounds, which
    ``prometheus_client``'s ``Histogram`` cannot do (the same buckets for every label value).
    """

    def __init__(
        self, name: str, doc: str, label: str | None, series: Sequence[tuple[str, Sequence[float]]]
    ) -> None:
        self.name = name
        self.doc = doc
        labelnames: tuple[str, ...] = (label,) if label else ()
        self._series: list[tuple[dict[str, str], list[str], int]] = []  # labels, les, offset
        self._bounds: list[np.ndarray] = []
        offset = 0
        for value, bounds in series:
            labels = {label: value} if label else {}
            les = [*(floatToGoString(b) for b in bounds), "+Inf"]
            self._series.append((labels, les, offset))
            self._bounds.append(np.asarray(bounds, dtype=np.float64))
            offset += len(les)
        self._counts = np.zeros(offset, dtype=np.int64)
        self._sums = np.zeros(len(series), dtype=np.float64)
        self._files: tuple[list[Any], list[Any]] | None = None
        if getattr(values.ValueClass, "_multiprocess", False):
            make = values.ValueClass
            buckets, sums = [], []
            for labels, les, _ in self._series:
                labelvalues = tuple(labels.values())
                buckets += [
                    make("histogram", name, f"{name}_bucket", (*labels, "le"),
                         (*labelvalues, le), doc)
                    for le in les
                ]  # fmt: skip
                sums.append(make("histogram", name, f"{name}_sum", labelnames, labelvalues, doc))
            self._files = buckets, sums

    def observe(self, matrix: np.ndarray) -> None:
        """``matrix``: one row per observation, column ``j`` for series ``j``. Values that are
        not finite (NaN: missing) are left out."""
        if not matrix.shape[0]:
            return
        n_slots = len(self._counts)
        index = np.empty(matrix.shape, dtype=np.intp)
        for j, (bounds, (_, _, offset)) in enumerate(zip(self._bounds, self._series, strict=True)):
            # side="left": a value equal to a bound is in that bound's bucket (le: <=)
            np.add(bounds.searchsorted(matrix[:, j]), offset, out=index[:, j])
        finite = np.isfinite(matrix)
        if finite.all():
            self._counts += np.bincount(index.ravel(), minlength=n_slots)
            self._sums += matrix.sum(axis=0, dtype=np.float64)
        else:
            index[~finite] = n_slots  # an extra slot, dropped
            self._counts += np.bincount(index.ravel(), minlength=n_slots + 1)[:n_slots]
            self._sums += np.where(finite, matrix, 0.0).sum(axis=0, dtype=np.float64)

    def write(self) -> None:
        """With several workers: add what was observed since the last call to the files."""
        if self._files is None:
            return
        buckets, sums = self._files
        counts = self._counts
        filled = np.flatnonzero(counts)
        for i, count in zip(filled.tolist(), counts[filled].tolist(), strict=True):
            buckets[i].inc(count)
        for slot, total in zip(sums, self._sums.tolist(), strict=True):
            if total:
                slot.inc(total)
        counts[:] = 0
        self._sums[:] = 0.0

    def collect(self) -> Metric:
        """The family as ``prometheus_client``'s ``Histogram`` exposes one (one process)."""
        family = Metric(self.name, self.doc, "histogram")
        for (labels, les, offset), total in zip(self._series, self._sums.tolist(), strict=True):
            cumulative = np.cumsum(self._counts[offset : offset + len(les)]).tolist()
            for le, count in zip(les, cumulative, strict=True):
                family.add_sample(f"{self.name}_bucket", {**labels, "le": le}, float(count))
            family.add_sample(f"{self.name}_count", labels, float(cumulative[-1]))
            family.add_sample(f"{self.name}_sum", labels, total)
        return family


class _DistributionCollector:
    """Exposes the distributions in a one-process registry (none until they are set)."""

    def __init__(self) -> None:
        self.families: list[_Distribution] = []

    def collect(self) -> Iterable[Metric]:
        return [family.collect() for family in self.families]


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
        self._ready_gauge = gauge(
            "ready", "1 once the model is loaded and a warm-up prediction succeeded.", "livemin"
        )
        self._model_info = gauge(
            "model_info", "The served model (labels); always 1.", "livemax", MODEL_INFO_LABELS
        )
        self._load_seconds: Gauge | None = None  # exposed once the model is loaded
        self._version: Gauge | None = None  # exposed for a model from the registry
        # The input and prediction distributions, set once the model is known.
        self._distributions = _DistributionCollector()
        if own is not None:
            own.register(self._distributions)  # type: ignore[arg-type]
        self.features: tuple[str, ...] | None = None
        self._feature_values: _Distribution | None = None
        self._prediction_values: _Distribution | None = None
        self._distribution_errors = 0
        workers = gauge("workers", "Live worker processes of this server.", "livesum")
        workers.set(1)
        start = gauge("start_time_seconds", "Unix time the server process started.", "livemin")
        start.set(round(self.started, 3))
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
            requests[key] = requests.get(key, 0) + 1
            tally = latency.get(route)
            if tally is None:
                tally = latency[route] = _Tally(bounds)
            seconds = record[R_SECONDS]
            tally.counts[bisect_left(bounds, seconds)] += 1
            tally.total += seconds
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

    def count_pyfunc_call(self) -> None:
        self._pyfunc_calls.inc()

    def set_distributions(
        self,
        features: Sequence[str],
        profile: Mapping[str, Any] | None = None,
        max_features: int = DEFAULT_MAX_FEATURE_HISTOGRAMS,
    ) -> tuple[str, ...]:
        """Start the feature and prediction histograms (once per process).

        ``features``: the model's input columns, in the order of the rows given to
        :meth:`observe_rows`; the first ``max_features`` get a histogram (a warning names the
        others). ``profile``: the training run's drift profile; a column's ``edges`` are its
        bucket bounds (the predictions': ``__prediction__``'s), :data:`GENERIC_VALUE_BUCKETS`
        for a column it lacks. Returns the features that have a histogram.
        """
        if self.features is not None:
            raise RuntimeError("the distributions are set once per process")
        features = tuple(features)
        kept = features[: max(0, max_features)]
        if len(kept) < len(features):
            left = features[len(kept) :]
            log.warning(
                "the model has %d input columns: feature histograms for the first %d only "
                "(--max-feature-histograms), none for %s%s",
                len(features),
                len(kept),
                ", ".join(left[:5]),
                f" and {len(left) - 5} more" if len(left) > 5 else "",
            )
        columns = profile.get("columns") if isinstance(profile, Mapping) else None
        columns = columns if isinstance(columns, Mapping) else {}
        profiled = []

        def bounds_of(column: str) -> tuple[float, ...]:
            entry = columns.get(column)
            bounds = bucket_bounds(entry.get("edges")) if isinstance(entry, Mapping) else None
            if bounds is None:
                return GENERIC_VALUE_BUCKETS
            profiled.append(column)
            return bounds

        families = []
        if kept:
            self._feature_values = _Distribution(
                FEATURE_VALUE,
                "Values of the model's input features in answered requests, per feature.",
                "feature",
                [(f, bounds_of(f)) for f in kept],
            )
            families.append(self._feature_values)
        self._prediction_values = _Distribution(
            PREDICTION_VALUE,
            "The model's predictions in answered requests.",
            None,
            [("", bounds_of(DRIFT_PROFILE_PREDICTION))],
        )
        families.append(self._prediction_values)
        self._distributions.families = families
        self.features = kept
        log.info(
            "histograms of %d features and the predictions; buckets from the drift profile "
            "for %d of them (%s), generic for %d",
            len(kept),
            len(profiled),
            ", ".join(profiled) or "none",
            len(kept) + 1 - len(profiled),
        )
        return kept

    def observe_rows(self, samples: Iterable[tuple[Any, Any]]) -> None:
        """Answered rows and their predictions, as ``(rows, predictions)`` pairs (either may
        be None): ``rows`` a matrix (a float32 or float64 array) or a list of rows (lists of
        numbers) whose first columns are :attr:`features` in order, ``predictions`` a 1-D
        array or a list of numbers. Nothing happens before :meth:`set_distributions`."""
        predict = self._prediction_values
        if predict is None:
            return
        width = len(self.features or ())
        matrices: list[np.ndarray] = []
        listed: list[Any] = []
        arrays: list[np.ndarray] = []
        numbers: list[Any] = []
        for rows, outputs in samples:  # the lists are joined here, converted once below
            if rows is not None and width:
                if type(rows) is list:
                    listed += rows
                else:
                    matrices.append(rows)
            if outputs is not None:
                if type(outputs) is list:
                    numbers += outputs
                else:
                    arrays.append(outputs)
        try:
            features = self._feature_values
            if features is not None and (listed or matrices):
                if listed:
                    matrices.append(np.array(listed, dtype=np.float32))
                matrices = [m if m.shape[1] == width else m[:, :width] for m in matrices]
                features.observe(matrices[0] if len(matrices) == 1 else np.concatenate(matrices))
            if numbers:
                arrays.append(np.array(numbers, dtype=np.float64))
            if arrays:
                values = arrays[0] if len(arrays) == 1 else np.concatenate(arrays)
                predict.observe(values.reshape(-1, 1))
        except Exception:  # never let a bad sample stop the other metrics and the access log
            self._distribution_errors += 1
            if self._distribution_errors == 1:
                log.warning("could not record input distributions", exc_info=True)

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
        for family in self._distributions.families:
            family.write()

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
