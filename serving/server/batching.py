"""Micro-batching: concurrent requests, each parsed and validated on its own first, share one
model call (:meth:`MicroBatcher.submit`) and get their slice of the answer.

Scheduling: requests wait while the model is busy (where batches come from under load), else at
most ``max_wait_s``. The default, 0, is the next loop turn (no timer for a lone request); when
the last batch was shared, one turn more, and then more turns (at most
:data:`MAX_DEFERRED_TURNS`, microseconds each) while fewer requests than last time have come.
A burst from clients arrives over a couple of turns, and one extra turn lets it share one call
instead of two or three, most of the throughput at 8 closed-loop clients; behind a proxy, which
hands the burst over one request at a time, it takes a few more (docs/benchmarks.md). A batch
exceeds ``max_batch_rows`` only for one bigger request, run alone. When a shared call raises,
each request re-runs alone.

``mode="auto"`` calls the model on the event loop for at most ``inline_max_rows`` rows (cheaper
than a thread hand-off for the fast path; docs/benchmarks.md), else in one model thread so a
large request never blocks the loop (TensorFlow releases the GIL); ``"thread"``, ``"inline"``.
``merge``/``take``/``count`` batch other inputs (a pyfunc's DataFrames: ``pandas.concat``, a
request's rows of the outputs, their row count); a merge that raises is a failed shared call.
Observers run on the loop and never fail a batch: ``on_batch(rows, requests, fell_back)`` per
batch, ``on_outputs(input, outputs)`` per successful model call, by reference (the histograms
count them later, in bulk).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, NamedTuple

import numpy as np

log = logging.getLogger(__name__)

# Rows: a 2-D array, or a list of equal-length lists of numbers.
Rows = np.ndarray | list
PredictFn = Callable[[Rows], np.ndarray]
BatchObserver = Callable[[int, int, bool], None]
OutputsObserver = Callable[[Rows, np.ndarray], None]

DEFAULT_MAX_BATCH_ROWS = 256
DEFAULT_INLINE_MAX_ROWS = 64
MAX_WAIT_LIMIT_S = 0.05
# Loop turns a batch waits, at most, for as many requests as the last batch had.
MAX_DEFERRED_TURNS = 8


class MicroBatcher:
    """Coalesce concurrent ``predict`` calls into one call of ``predict_fn``.

    ``predict_fn`` takes a 2-D array (rows x features) and returns one value per row (any shape
    whose first axis is the rows); a request submitted as a list of rows reaches it as it is
    when alone, and as one array (``np.array`` of all rows) when batched with other lists.
    Must be used from a single event loop.
    """

    def __init__(
        self,
        predict_fn: PredictFn,
        *,
        max_batch_rows: int = DEFAULT_MAX_BATCH_ROWS,
        max_wait_s: float = 0.0,
        mode: Literal["auto", "thread", "inline"] = "auto",
        inline_max_rows: int = DEFAULT_INLINE_MAX_ROWS,
        on_batch: BatchObserver | None = None,
        on_outputs: OutputsObserver | None = None,
        merge: Callable[[list], Any] | None = None,
        take: Callable[[Any, int, int], Any] | None = None,
        count: Callable[[Any], int] | None = None,
    ) -> None:
        if max_batch_rows < 1:
            raise ValueError("max_batch_rows must be >= 1")
        if not 0.0 <= max_wait_s <= MAX_WAIT_LIMIT_S:
            raise ValueError(f"max_wait_s must be within [0, {MAX_WAIT_LIMIT_S}]")
        if mode not in ("auto", "thread", "inline"):
            raise ValueError(f"unknown mode {mode!r}")
        self._predict_fn = predict_fn
        self.max_batch_rows = max_batch_rows
        self.max_wait_s = max_wait_s
        self.mode = mode
        self.inline_max_rows = inline_max_rows
        self._on_batch = on_batch
        self._on_outputs = on_outputs
        self._ops = None if merge is None else _Ops(merge, take or _slice, count or len)
        self._pending: list[tuple[Rows, asyncio.Future[np.ndarray]]] = []
        self._pending_rows = 0
        self._busy = False
        self._timer: asyncio.Handle | asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._last_batch_requests = 0
        self._deferred = 0

    # -- public API ------------------------------------------------------------------------

    def submit(self, rows: Rows) -> asyncio.Future[np.ndarray]:
        """Queue this request's rows; the future gets its predictions (first axis = its rows).

        The cheap form of :meth:`predict` for the server's hot path (no coroutine frame).
        """
        loop = self._loop
        if loop is None:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            loop = self._loop = asyncio.get_running_loop()
        elif self._closed:
            raise RuntimeError("the batcher is closed")
        future = loop.create_future()
        self._pending.append((rows, future))
        self._pending_rows += len(rows)
        if not self._busy:
            if self._pending_rows >= self.max_batch_rows:
                self._flush()
            elif self._timer is None:
                if self.max_wait_s > 0:
                    self._timer = loop.call_later(self.max_wait_s, self._flush)
                else:
                    self._timer = loop.call_soon(self._flush)
        return future

    async def predict(self, rows: Rows) -> np.ndarray:
        """This request's predictions (first axis = its rows), computed in some batch."""
        return await self.submit(rows)

    async def close(self) -> None:
        """Stop accepting work; waits for the running call, then stops the thread."""
        self._closed = True
        while self._busy or self._pending:
            await asyncio.sleep(0.005)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # -- internals (all on the event loop thread) ------------------------------------------

    def _take(self) -> tuple[list[tuple[Rows, asyncio.Future[np.ndarray]]], int]:
        """The next batch (at most max_batch_rows unless one request alone is bigger), and its
        row count; requests whose caller went away are dropped."""
        pending = self._pending
        limit = self.max_batch_rows
        if self._pending_rows <= limit:  # the common case: everything that waits
            taken, self._pending = pending, []
            self._pending_rows = 0
        else:
            rows = end = 0
            for x, _ in pending:
                if end and rows + len(x) > limit:
                    break
                rows += len(x)
                end += 1
            taken, self._pending = pending[:end], pending[end:]
            self._pending_rows -= rows
        batch = [item for item in taken if not item[1].done()]  # done = cancelled
        return batch, sum(len(x) for x, _ in batch)

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._busy:
            return
        # Requests came in together last time: give the loop more turns to read the ones
        # whose bytes arrive meanwhile, so that they share this model call.
        if (self._last_batch_requests > 1 and self.max_wait_s == 0
                and self._pending_rows < self.max_batch_rows
                and (not self._deferred or (len(self._pending) < self._last_batch_requests
                                            and self._deferred < MAX_DEFERRED_TURNS))):  # fmt: skip
            self._deferred += 1
            assert self._loop is not None
            self._timer = self._loop.call_soon(self._flush)
            return
        self._deferred = 0
        batch, rows = self._take()
        if not batch:
            return
        if self.mode == "inline" or (self.mode == "auto" and rows <= self.inline_max_rows):
            ran = _run_batch(self._predict_fn, [x for x, _ in batch], rows, self._ops)
            self._deliver(batch, rows, ran)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        self._busy = True
        assert self._loop is not None
        arrays = [x for x, _ in batch]
        done = self._loop.run_in_executor(
            self._executor, _run_batch, self._predict_fn, arrays, rows, self._ops
        )
        done.add_done_callback(lambda f: self._on_done(batch, rows, f))

    def _on_done(self, batch, rows: int, done: asyncio.Future) -> None:
        self._busy = False
        try:
            ran = done.result()
        except BaseException as exc:  # the executor itself failed: fail this batch only
            ran = [exc] * len(batch), False, []
        self._deliver(batch, rows, ran)

    def _deliver(self, batch, rows: int, ran: _Ran) -> None:
        results, fell_back, calls = ran
        self._last_batch_requests = len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)
        if self._on_batch is not None:
            try:
                self._on_batch(rows, len(batch), fell_back)
            except Exception:  # an observer must never fail a batch
                log.debug("batch observer failed", exc_info=True)
        if self._on_outputs is not None:
            try:
                for inputs, outputs in calls:
                    self._on_outputs(inputs, outputs)
            except Exception:
                log.debug("outputs observer failed", exc_info=True)
        if self._pending:
            # These requests arrived while the model was busy: they have waited already. After an
            # inline call, first let the loop read what arrived meanwhile (bigger next batch).
            if self._busy:
                return
            if self._timer is None:
                assert self._loop is not None
                self._timer = self._loop.call_soon(self._flush)


# What a batch gave: one result (outputs or error) per request, whether it fell back to one
# call per request, and each successful model call's (input, outputs).
_Ran = tuple[list[np.ndarray | BaseException], bool, list[tuple[Rows, np.ndarray]]]


class _Ops(NamedTuple):
    merge: Callable[[list], Any]
    take: Callable[[Any, int, int], Any]
    count: Callable[[Any], int]


def _slice(outputs: Any, start: int, stop: int) -> Any:
    return outputs[start:stop]


def _run_batch(
    predict_fn: PredictFn, arrays: list[Rows], total: int, ops: _Ops | None = None
) -> _Ran:
    """One call for all arrays (``total`` rows); if it fails, one call per array."""
    if len(arrays) == 1:
        result = _call_one(predict_fn, arrays[0], ops)
        calls = [] if isinstance(result, BaseException) else [(arrays[0], result)]
        return [result], False, calls
    try:
        if ops is not None:
            merged = ops.merge(arrays)
            outputs = predict_fn(merged)
            if (n := ops.count(outputs)) != total:
                raise ValueError(f"model returned {n} rows for {total}")
            take = ops.take
        else:
            if all(type(a) is list for a in arrays):  # rows as lists (small server requests)
                merged = np.array([row for a in arrays for row in a])
            else:
                merged = np.concatenate(arrays)
            outputs = np.asarray(predict_fn(merged))
            if outputs.shape[:1] != (total,):
                raise ValueError(f"model returned {outputs.shape[:1]} rows for {total}")
            take = _slice
        results: list[np.ndarray | BaseException] = []
        start = 0
        for a in arrays:
            results.append(take(outputs, start, start + len(a)))
            start += len(a)
        return results, False, [(merged, outputs)]
    except Exception:
        log.warning("a batched call of %d requests failed: re-running them one by one", len(arrays))
        results = [_call_one(predict_fn, a, ops) for a in arrays]
        calls = [
            (a, r) for a, r in zip(arrays, results, strict=True) if not isinstance(r, BaseException)
        ]
        return results, True, calls


def _call_one(predict_fn: PredictFn, rows: Rows, ops: _Ops | None = None) -> Any:
    try:
        if ops is not None:  # a lone request's outputs are all its own: nothing to split
            return predict_fn(ops.merge([rows]))
        outputs = np.asarray(predict_fn(rows))
        if outputs.shape[:1] != (len(rows),):
            raise ValueError(f"model returned {outputs.shape[:1]} rows for {len(rows)}")
        return outputs
    except Exception as exc:
        return exc
