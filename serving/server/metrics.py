"""Prometheus metrics for the model server, in the text exposition format (version 0.0.4).

Hand-rolled instead of ``prometheus_client``: the server is single-threaded on its hot path
(one asyncio event loop per process), so plain integer counters need no locks, and there is no
dependency to pin. The request path does not even touch them: it appends one tuple per finished
request to a list that the server turns into access-log lines and metric updates in batches,
at least every 0.25 s, and before every ``/metrics`` answer (:meth:`ServerMetrics.observe_records`);
an observation is then one ``bisect`` on precomputed bounds and a few additions.

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
- ``workers``                                      gauge: live worker processes
- ``start_time_seconds``                           gauge

With ``--workers N`` (several processes behind one port), every worker answers ``/metrics`` for
the whole server, like ``prometheus_client``'s multiprocess mode. The parent names a directory
in ``SERVING_METRICS_DIR``: a new temporary one (removed at exit), or the one the variable
already names (old worker files in it are removed first). Each worker writes its own numbers
there as one JSON file (``worker-<pid>-<start>.json``, replaced atomically) at most every
0.25 s while something changed, and at shutdown; a ``/metrics`` request in any worker reads
every file and adds them up. Counters and histograms add up over every worker that ever ran,
dead or restarted ones included (a dead worker's file stays, so totals never go down; only what
a worker counted in its last 0.25 s before a SIGKILL is lost). Gauges count live workers only:
``requests_in_flight`` is their sum, ``ready`` their minimum (1 when every live worker is
ready), ``model_load_seconds`` their maximum, ``start_time_seconds`` the earliest, ``workers``
their number; ``model_info`` appears once per distinct model (so once). Other workers' numbers
can be up to 0.25 s old; the answering worker adds its current ones, writes them to its file
first (so a later scrape answered by another worker never shows less: counters never appear
to go down between scrapes), and names itself in an ``X-Worker-Pid`` response header. With
one worker (the default) nothing is written anywhere.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import os
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PREFIX = "model_server_"
MULTIPROCESS_DIR_ENV = "SERVING_METRICS_DIR"
STATE_VERSION = 1

# Request latency: the server answers in ~0.2-5 ms; the long tail is for big or slow models.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
BATCH_ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 16384)
BATCH_REQUEST_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)

# One finished request, as the server records it (see ServerMetrics.observe_records):
# (end perf_counter, seconds, method, path, status, bytes_in, bytes_out, client, rows, error_code)
R_END, R_SECONDS, R_METHOD, R_PATH, R_STATUS, R_BYTES_IN, R_BYTES_OUT, R_CLIENT, R_ROWS, R_ERROR = (
    range(10)
)


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

    def state(self) -> list[Any]:
        return [list(self._counts), self.sum]

    def add_state(self, state: Sequence[Any]) -> None:
        counts, total = state
        if len(counts) != len(self._counts):  # another version's buckets: cannot be merged
            return
        for i, c in enumerate(counts):
            self._counts[i] += c
        self.count += sum(counts)
        self.sum += total

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
    """All metrics of one server process. Not thread-safe: update from the event loop only.

    ``routes`` maps request paths to their ``route`` label (others are ``"other"``);
    ``multiprocess_dir``: see the module docstring (None: this process is the whole server).
    """

    def __init__(
        self, routes: Mapping[str, str] | None = None, multiprocess_dir: str | None = None
    ) -> None:
        self.routes = dict(routes) if routes is not None else None
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
        self.store = WorkerFiles(multiprocess_dir) if multiprocess_dir else None

    # -- updates ----------------------------------------------------------------------------

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        key = (route, method, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        hist = self.latency.get(route)
        if hist is None:
            hist = self.latency[route] = Histogram(LATENCY_BUCKETS)
        hist.observe(seconds)

    def observe_records(self, records: Iterable[Sequence[Any]]) -> None:
        """Count finished requests recorded as tuples (layout: the ``R_*`` indexes)."""
        routes = self.routes or {}
        requests = self.requests
        latency = self.latency
        predictions = 0
        for record in records:
            route = routes.get(record[R_PATH], "other")
            status = record[R_STATUS]
            key = (route, record[R_METHOD], status)
            requests[key] = requests.get(key, 0) + 1
            hist = latency.get(route)
            if hist is None:
                hist = latency[route] = Histogram(LATENCY_BUCKETS)
            hist.observe(record[R_SECONDS])
            if status == 200 and record[R_ROWS]:
                predictions += record[R_ROWS]
        self.predictions += predictions

    def observe_batch(self, rows: int, requests: int) -> None:
        self.model_calls["fast"] += 1
        self.batch_rows.observe(rows)
        self.batch_requests.observe(requests)

    def set_model(self, labels: Mapping[str, str | None], load_seconds: float) -> None:
        self.model_labels = {k: "" if v is None else str(v) for k, v in labels.items()}
        self.model_load_seconds = load_seconds

    # -- state (for --workers N) ------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """This process's numbers as plain JSON-able data."""
        return {
            "v": STATE_VERSION,
            "requests": [[*key, count] for key, count in sorted(self.requests.items())],
            "latency": {route: h.state() for route, h in sorted(self.latency.items())},
            "in_flight": self.in_flight,
            "predictions": self.predictions,
            "model_calls": dict(self.model_calls),
            "batch_rows": self.batch_rows.state(),
            "batch_requests": self.batch_requests.state(),
            "batch_fallbacks": self.batch_fallbacks,
            "ready": self.ready,
            "model_labels": self.model_labels,
            "model_load_seconds": self.model_load_seconds,
            "started": self.started,
        }

    def persist(self) -> None:
        """Write this worker's file (multiprocess mode only; skipped when nothing changed)."""
        if self.store is not None:
            self.store.write(self.snapshot())

    # -- exposition -------------------------------------------------------------------------

    def render(self) -> bytes:
        own = self.snapshot()
        if self.store is None:
            return render_states([own], [own])
        # Publish what this answer shows of this worker first: a later scrape answered by
        # another worker then reads at least these numbers, so no counter ever appears to go
        # down between two scrapes (Prometheus would take that for a restart).
        # Without the /metrics request being answered: it ends right after this.
        self.store.write({**own, "in_flight": max(0, own["in_flight"] - 1)})
        every, live = self.store.read_all(own)
        return render_states(every, live)


def render_states(every: Sequence[Mapping[str, Any]], live: Sequence[Mapping[str, Any]]) -> bytes:
    """The exposition for a whole server: counters summed over ``every`` worker's snapshot,
    gauges over the ``live`` ones."""
    requests: dict[tuple[str, str, int], int] = {}
    latency: dict[str, Histogram] = {}
    model_calls: dict[str, int] = {"fast": 0, "pyfunc": 0}
    batch_rows = Histogram(BATCH_ROW_BUCKETS)
    batch_requests = Histogram(BATCH_REQUEST_BUCKETS)
    predictions = fallbacks = 0
    for state in every:
        for route, method, status, count in state["requests"]:
            key = (route, method, int(status))
            requests[key] = requests.get(key, 0) + count
        for route, hist_state in state["latency"].items():
            hist = latency.get(route)
            if hist is None:
                hist = latency[route] = Histogram(LATENCY_BUCKETS)
            hist.add_state(hist_state)
        for path, count in state["model_calls"].items():
            model_calls[path] = model_calls.get(path, 0) + count
        batch_rows.add_state(state["batch_rows"])
        batch_requests.add_state(state["batch_requests"])
        predictions += state["predictions"]
        fallbacks += state["batch_fallbacks"]
    in_flight = sum(s["in_flight"] for s in live)
    ready = min((s["ready"] for s in live), default=0)
    infos: list[dict[str, str]] = []
    for s in live:
        if s["model_labels"] is not None and s["model_labels"] not in infos:
            infos.append(s["model_labels"])
    loads = [s["model_load_seconds"] for s in live if s["model_load_seconds"] is not None]
    started = min((s["started"] for s in live), default=None)

    p = PREFIX
    lines: list[str] = []

    def header(name: str, kind: str, help_text: str) -> None:
        lines.append(f"# HELP {p}{name} {help_text}")
        lines.append(f"# TYPE {p}{name} {kind}")

    header("requests_total", "counter", "HTTP requests by route, method and status code.")
    for (route, method, status), count in sorted(requests.items()):
        labels = _labels(("route", "method", "status"), (route, method, str(status)))
        lines.append(f"{p}requests_total{labels} {count}")

    header("request_duration_seconds", "histogram", "Request latency in seconds by route.")
    for route, hist in sorted(latency.items()):
        lines.extend(hist.lines(f"{p}request_duration_seconds", ("route",), (route,)))

    header("requests_in_flight", "gauge", "Requests being processed now.")
    lines.append(f"{p}requests_in_flight {in_flight}")

    header("predictions_total", "counter", "Rows answered with a prediction.")
    lines.append(f"{p}predictions_total {predictions}")

    header("model_calls_total", "counter", "Model invocations by inference path.")
    for path, count in sorted(model_calls.items()):
        lines.append(f'{p}model_calls_total{{path="{_escape(path)}"}} {count}')

    header("batch_rows", "histogram", "Rows per fast-path model call (micro-batching).")
    lines.extend(batch_rows.lines(f"{p}batch_rows", (), ()))
    header("batch_requests", "histogram", "Requests coalesced into one fast-path model call.")
    lines.extend(batch_requests.lines(f"{p}batch_requests", (), ()))
    header(
        "batch_fallbacks_total",
        "counter",
        "Batches whose call failed and were re-run per request.",
    )
    lines.append(f"{p}batch_fallbacks_total {fallbacks}")

    header("ready", "gauge", "1 once the model is loaded and a warm-up prediction succeeded.")
    lines.append(f"{p}ready {ready}")

    if infos:
        header("model_info", "gauge", "The served model (labels); always 1.")
        for info in infos:
            names = tuple(info)
            values = tuple(info[n] for n in names)
            lines.append(f"{p}model_info{_labels(names, values)} 1")
    if loads:
        header("model_load_seconds", "gauge", "Seconds spent loading and warming the model.")
        lines.append(f"{p}model_load_seconds {_num(round(max(loads), 3))}")

    header("workers", "gauge", "Live worker processes of this server.")
    lines.append(f"{p}workers {len(live)}")
    if started is not None:
        header("start_time_seconds", "gauge", "Unix time the server process started.")
        lines.append(f"{p}start_time_seconds {_num(round(started, 3))}")
    lines.append("")
    return "\n".join(lines).encode()


# -- one file per worker (--workers N) -----------------------------------------------------------


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of ``/proc/<pid>/stat`` after the command name (Linux), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    return fields if len(fields) > 19 else None


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid``, to tell a live worker from a reused pid."""
    fields = _proc_stat(pid)
    return fields[19] if fields else None


def _alive(pid: int, start: str | None) -> bool:
    """Whether the worker that wrote a file still runs (not a zombie, not a reused pid)."""
    fields = _proc_stat(pid)
    if fields is not None:
        return fields[0] not in ("Z", "X", "x") and (start is None or fields[19] == start)
    try:  # no /proc (macOS): the pid exists and is ours
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def clear_worker_files(directory: str) -> None:
    """Remove the worker files a previous server left in ``directory``."""
    for path in Path(directory).glob("worker-*"):
        with contextlib.suppress(OSError):
            path.unlink()


class WorkerFiles:
    """This worker's metrics file in the shared directory, and reading everybody's."""

    def __init__(self, directory: str) -> None:
        self.directory = Path(directory)
        self.pid = os.getpid()
        self.start = _process_start(self.pid)
        self.path = self.directory / f"worker-{self.pid}-{self.start or time.time_ns()}.json"
        self._last: bytes | None = None

    def write(self, state: dict[str, Any]) -> None:
        data = json.dumps({**state, "pid": self.pid, "pstart": self.start}).encode()
        if data == self._last:
            return
        tmp = self.path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
        except OSError:  # the directory went away (the server is stopping): keep serving
            return
        self._last = data

    def read_all(self, own: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(every worker's state, the live workers' states); ``own`` stands for this worker."""
        every, live = [own], [own]
        try:
            paths = sorted(self.directory.glob("worker-*.json"))
        except OSError:
            paths = []
        for path in paths:
            if path == self.path:
                continue
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                state = json.loads(path.read_bytes())
                if state.get("v") != STATE_VERSION:
                    continue
                every.append(state)
                if _alive(int(state["pid"]), state.get("pstart")):
                    live.append(state)
        return every, live
