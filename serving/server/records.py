"""What the request path records, turned into metric updates and access-log lines in batches.

The request path does no more than append: one tuple per finished request to
:attr:`Recorder.records` (``serving.server.metrics.R_*`` layout), one tuple per model call of
the micro-batchers, one ``(rows, predictions)`` reference per answered call for the feature
and prediction histograms, and a mirrored request's two answers (``serving.server.shadow``);
the payload log keeps its sampled answers itself. :meth:`Recorder.flush` makes them metric
updates and access-log lines, and hands the sampled requests to the payload log's writer: at
least every 0.25 s (a timer the first record after a flush sets), every 256 requests, before
every ``/metrics`` answer and at shutdown.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np

from serving.server.logs import AccessLog
from serving.server.metrics import ServerMetrics
from serving.server.payload import PayloadLog

FLUSH_S = 0.25
MAX_RECORDS = 256


class Recorder:
    """The records of one worker process; use from the event loop only."""

    def __init__(self, metrics: ServerMetrics, access: AccessLog) -> None:
        self.metrics = metrics
        self.access = access
        self.records: list[tuple] = []
        self.flush_handle: asyncio.TimerHandle | None = None
        # (rows, requests, fell back) of the fast path's model calls, and of shared pyfunc calls.
        self._batches: list[tuple[int, int, bool]] = []
        self._pyfunc_batches: list[tuple[int, int, bool]] = []
        # (rows, predictions) of answered model calls, by reference (the histograms).
        self.observed: list[tuple[Any, Any]] = []
        # (own answer, live answer) bodies of mirrored requests (serving.server.shadow).
        self.shadow: list[tuple[bytes, bytes]] = []
        self._tick_handle: asyncio.TimerHandle | None = None
        self.payload_log: PayloadLog | None = None  # its sampled answers wait there

    def request_done(self, record: tuple, loop: asyncio.AbstractEventLoop | None) -> None:
        """One finished request (flushes when there are enough, or sets the flush timer)."""
        records = self.records
        records.append(record)
        if len(records) >= MAX_RECORDS:
            self.flush()
        elif self.flush_handle is None:
            loop = loop or asyncio.get_running_loop()
            self.flush_handle = loop.call_later(FLUSH_S, self.flush)

    def on_batch(self, rows: int, requests: int, fell_back: bool) -> None:
        """A fast-path model call (the micro-batcher's ``on_batch``)."""
        self._batches.append((rows, requests, fell_back))

    def on_pyfunc_batch(self, rows: int, requests: int, fell_back: bool) -> None:
        """A shared pyfunc call (``serving.server.pyfunc_batching``)."""
        self._pyfunc_batches.append((rows, requests, fell_back))

    def on_outputs(self, rows: Any, outputs: np.ndarray) -> None:
        """A fast-path model call's input and outputs, by reference (the micro-batcher's
        ``on_outputs``)."""
        self.observed.append((rows, outputs))

    def flush(self) -> None:
        """Turn the recorded requests and batches into metric updates and access-log lines."""
        if self.flush_handle is not None:
            self.flush_handle.cancel()
            self.flush_handle = None
        metrics = self.metrics
        if batches := self._batches:
            self._batches = []
            metrics.observe_batches(batches)
        if batches := self._pyfunc_batches:
            self._pyfunc_batches = []
            metrics.observe_batches(batches, fast=False)
        if observed := self.observed:
            self.observed = []
            metrics.observe_rows(observed)
        if self.payload_log is not None and self.payload_log.pending:
            self.payload_log.submit(time.time() - time.perf_counter())
        if shadow := self.shadow:
            self.shadow = []
            metrics.observe_shadow(shadow)
        records = self.records
        if not records:
            return
        self.records = []
        metrics.observe_records(records)
        if self.access.enabled:
            self.access.write_records(records, time.time() - time.perf_counter())

    def start_ticking(self, loop: asyncio.AbstractEventLoop) -> None:
        """With --workers N: bring this worker's numbers up to date for the others' /metrics,
        every 0.25 s until :meth:`stop`."""
        self.flush()
        self.metrics.publish()
        self._tick_handle = loop.call_later(FLUSH_S, self.start_ticking, loop)

    def stop(self) -> None:
        """At shutdown: no more ticks; what is recorded is flushed."""
        if self._tick_handle is not None:
            self._tick_handle.cancel()
            self._tick_handle = None
        self.flush()
