"""Prometheus metrics for the model server, in the text exposition format (version 0.0.4).

Hand-rolled instead of ``prometheus_client``: the server is single-threaded on its hot path
(one asyncio event loop per process), so plain integer counters need no locks, an
observation is one ``bisect`` and two additions, and there is no dependency to pin.

Exposed series (all prefixed ``model_server_``):

- ``requests_total{route,method,status}``         counter
- ``request_duration_seconds{route}``              histogram
- ``requests_in_flight``                           gauge
- ``predictions_total``                            counter: rows answered with a prediction
- ``model_calls_total{path}``                      counter: model calls (``fast``, ``pyfunc``)
- ``batch_rows``                                   histogram: rows per fast-path model call
- ``batch_requests``                               histogram: requests coalesced per model call
- ``batch_fallbacks_total``                        counter: batches re-run one request at a time
- ``ready``                                        gauge: 1 once the warm-up prediction succeeded
- ``model_info{name,version,uri,flavor,fast_path}`` gauge, always 1 (labels carry the data)
- ``model_load_seconds``                           gauge

With ``--workers N`` every worker process keeps its own numbers (scrape each pod/worker, or
run one worker per container, which is the Kubernetes shape).
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Iterable, Mapping, Sequence

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "model_server_"

# Request latency: the server answers in ~0.2-5 ms; the long tail is for big or slow models.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
BATCH_REQUEST_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape(str(v))}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def _num(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    if isinstance(value, int) or float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class Histogram:
    """A fixed-bucket histogram; ``observe`` is O(log buckets)."""

    __slots__ = ("_bounds", "_counts", "count", "sum")

    def __init__(self, bounds: Iterable[float]) -> None:
        self._bounds = tuple(sorted(bounds))
        self._counts = [0] * (len(self._bounds) + 1)  # the last slot is +Inf only
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self._bounds, value)] += 1
        self.count += 1
        self.sum += value

    def lines(
        self, name: str, label_names: Sequence[str], label_values: Sequence[str]
    ) -> list[str]:
        out = []
        cumulative = 0
        for bound, count in zip((*self._bounds, float("inf")), self._counts, strict=True):
            cumulative += count
            labels = _labels((*label_names, "le"), (*label_values, _num(bound)))
            out.append(f"{name}_bucket{labels} {cumulative}")
        labels = _labels(label_names, label_values)
        out.append(f"{name}_sum{labels} {_num(self.sum)}")
        out.append(f"{name}_count{labels} {self.count}")
        return out


class ServerMetrics:
    """All metrics of one server process. Not thread-safe: update from the event loop only."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = {}
        self.latency: dict[str, Histogram] = {}
        self.in_flight = 0
        self.predictions = 0
        self.model_calls: dict[str, int] = {"fast": 0, "pyfunc": 0}
        self.batch_rows = Histogram(BATCH_ROW_BUCKETS)
        self.batch_requests = Histogram(BATCH_REQUEST_BUCKETS)
        self.batch_fallbacks = 0
        self.ready = 0
        self.model_labels: dict[str, str] | None = None
        self.model_load_seconds: float | None = None
        self.started = time.time()

    # -- updates (hot path) ------------------------------------------------------------------

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = Histogram(LATENCY_BUCKETS)
        hist.observe(seconds)

    def observe_batch(self, rows: int, requests: int) -> None:
        self.model_calls["fast"] += 1
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)

    def set_model(self, labels: Mapping[str, str | None], load_seconds: float) -> None:
        self.model_labels = {k: "" if v is None else str(v) for k, v in labels.items()}
        self.model_load_seconds = load_seconds

    # -- exposition -------------------------------------------------------------------------

    def render(self) -> bytes:
        p = PREFIX
        lines: list[str] = []

        def header(name: str, kind: str, help_text: str) -> None:
            lines.append(f"# HELP {p}{name} {help_text}")
            lines.append(f"# TYPE {p}{name} {kind}")

        header("requests_total", "counter", "HTTP requests by route, method and status code.")
        for (route, method, status), count in sorted(self.requests.items()):
            labels = _labels(("route", "method", "status"), (route, method, str(status)))
            lines.append(f"{p}requests_total{labels} {count}")

        header("request_duration_seconds", "histogram", "Request latency in seconds by route.")
        for route, hist in sorted(self.latency.items()):
            lines.extend(hist.lines(f"{p}request_duration_seconds", ("route",), (route,)))

        header("requests_in_flight", "gauge", "Requests being processed now.")
        lines.append(f"{p}requests_in_flight {self.in_flight}")

        header("predictions_total", "counter", "Rows answered with a prediction.")
        lines.append(f"{p}predictions_total {self.predictions}")

        header("model_calls_total", "counter", "Model invocations by inference path.")
        for path, count in sorted(self.model_calls.items()):
            lines.append(f'{p}model_calls_total{{path="{path}"}} {count}')

        header("batch_rows", "histogram", "Rows per fast-path model call (micro-batching).")
        lines.extend(self.batch_rows.lines(f"{p}batch_rows", (), ()))
        header("batch_requests", "histogram", "Requests coalesced into one fast-path model call.")
        lines.extend(self.batch_requests.lines(f"{p}batch_requests", (), ()))
        header(
            "batch_fallbacks_total",
            "counter",
            "Batches whose call failed and were re-run per request.",
        )
        lines.append(f"{p}batch_fallbacks_total {self.batch_fallbacks}")

        header("ready", "gauge", "1 once the model is loaded and a warm-up prediction succeeded.")
        lines.append(f"{p}ready {self.ready}")

        if self.model_labels is not None:
            header("model_info", "gauge", "The served model (labels); always 1.")
            names = tuple(self.model_labels)
            values = tuple(self.model_labels[n] for n in names)
            lines.append(f"{p}model_info{_labels(names, values)} 1")
        if self.model_load_seconds is not None:
            header("model_load_seconds", "gauge", "Seconds spent loading and warming the model.")
            lines.append(f"{p}model_load_seconds {_num(round(self.model_load_seconds, 3))}")

        header("start_time_seconds", "gauge", "Unix time the server process started.")
        lines.append(f"{p}start_time_seconds {_num(round(self.started, 3))}")
        lines.append("")
        return "\n".join(lines).encode()
