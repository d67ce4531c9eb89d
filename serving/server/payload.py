"""The payload log: a sampled share of what the server answered, written off the request path
as the pipeline's own daily partitions, so that labels can later be joined to it
(``ml.quality``).

The request path only decides (:meth:`PayloadLog.sampled`) and appends the request id, rows,
predictions, latency and time to lists (:meth:`PayloadLog.add`); the recorder hands those over
in batches (:meth:`PayloadLog.submit`, every 0.25 s or 256 requests) to one writer thread,
through a queue bounded in rows: what does not fit is dropped and counted, a request never
waits for the log. Nothing kept for the log is an object the garbage collector tracks (rows of
Python numbers are packed into bytes): a few container objects kept alive per request tripled
the collector's runs and cost more than the writing.
The writer wakes once every :data:`WRITE_EVERY_S` and takes all that waits at once: each time
it runs, it competes with the event loop for the GIL, and handing the GIL back and forth costs
the server more CPU than the writing itself (docs/benchmarks.md, "Payload log cost").

The writer makes one row per answered row: the model's input columns, ``prediction``,
``request_id``, ``row`` (its position in the request), ``model_version``, ``latency_ms`` and
``served_at`` (unix seconds), in ``<path>/date=YYYY-MM-DD/payload-<host>-<pid>-<start>.<fmt>``:
Parquet where pyarrow is installed (the full image), JSON lines where it is not (the slim
image; the pipeline reads both). The host is the pod's name on Kubernetes, so every pod (and
every worker process) writes its own files. A file is written under a hidden name and renamed
when it is closed, so a reader never sees half of one: at ``max_file_mb`` (for Parquet, the
size of its rows in memory), after :data:`ROTATE_S`, at midnight UTC and at shutdown. A process
that wrote ``max_day_mb`` in a day drops (and counts) the rest of that day's rows. A path with
a scheme (``s3://...``) is written through fsspec: files are spooled locally and uploaded when
closed (fsspec and the store's driver must then be installed in the image).
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from serving.server.contract import (
    PAYLOAD_FILE_PREFIX,
    PAYLOAD_LATENCY_MS,
    PAYLOAD_REQUEST_ID,
    PAYLOAD_ROW,
    PAYLOAD_SERVED_AT,
    PAYLOAD_VERSION,
    PREDICTION_COLUMN,
)
from serving.server.jsoncodec import dumps

log = logging.getLogger("serving.server")

# Rows waiting for the writer at most (a few MB); beyond, new records are dropped and counted.
MAX_QUEUED_ROWS = 65_536
# How often the writer takes what waits.
WRITE_EVERY_S = 1.0
# A file is closed (and becomes visible to readers) at the latest this long after it opened.
ROTATE_S = 300.0
_DAY_S = 86_400


def default_format() -> str:
    """``parquet`` where pyarrow is installed, else ``jsonl``."""
    return "parquet" if importlib.util.find_spec("pyarrow") is not None else "jsonl"


class PayloadLog:
    """The payload log of one process: :meth:`sampled`, :meth:`add` and :meth:`submit` from the
    event loop, everything else in the writer thread. ``counted(outcome, rows)``: ``written``,
    ``dropped`` (queue full or day cap) or ``failed`` (the write raised)."""

    def __init__(
        self,
        path: str,
        sample_percent: float,
        columns: Sequence[str],
        version: str | None,
        *,
        max_file_mb: float = 32.0,
        max_day_mb: float = 1024.0,
        file_format: str | None = None,
        counted: Callable[[str, int], None] = lambda outcome, rows: None,
    ) -> None:
        if not 0.0 <= sample_percent <= 100.0:
            raise ValueError(f"sample_percent must be in [0, 100], got {sample_percent}")
        self.rate = sample_percent / 100.0
        self.columns = list(columns)
        self.version = version or ""
        self.format = file_format or default_format()
        self.max_file_bytes = max_file_mb * 1e6
        self.max_day_bytes = max_day_mb * 1e6
        self.counted = counted
        self._fs = None
        self._root = path.rstrip("/")
        if "://" in path:  # an object store: files are spooled here, uploaded when closed
            import fsspec

            self._fs, self._root = fsspec.core.url_to_fs(path)
            self._root = self._root.rstrip("/")
            self._spool = tempfile.mkdtemp(prefix="payload-log-")
        self._name = f"{PAYLOAD_FILE_PREFIX}{socket.gethostname()}-{os.getpid()}"
        # what add() collected since the last submit(): ids, rows, predictions, seconds, ends
        self._pending: tuple[list, list, list, list, list] = ([], [], [], [], [])
        self._pack = struct.Struct(f"{len(self.columns)}d").pack
        self._queue: list[tuple[tuple[list, ...], float]] = []
        self._queued = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._file: _File | None = None
        self._day_bytes: dict[int, float] = {}
        self._thread = threading.Thread(target=self._run, name="payload-log", daemon=True)
        self._thread.start()

    # -- the event loop's side ------------------------------------------------------------------

    def sampled(self) -> bool:
        return self.rate >= 1.0 or random.random() < self.rate

    def add(self, request_id: bytes, rows: Any, predictions: Any, seconds: float, end: float):
        """One sampled answer: ``rows`` lists of numbers or a matrix, ``predictions`` an
        array, ``end`` a ``time.perf_counter()``."""
        ids, matrices, outputs, latencies, ends = self._pending
        if type(rows) is list:
            try:
                pack = self._pack
                rows = pack(*rows[0]) if len(rows) == 1 else b"".join(pack(*r) for r in rows)
            except struct.error:  # not a row of this model's width: not logged
                self.counted("failed", len(predictions))
                return
        ids.append(request_id)
        matrices.append(rows)
        outputs.append(predictions)
        latencies.append(seconds)
        ends.append(end)

    @property
    def pending(self) -> bool:
        return bool(self._pending[0])

    def submit(self, wall_offset: float) -> None:
        """Hand what :meth:`add` collected to the writer (``wall_offset``: ``time.time() -
        time.perf_counter()``), or drop and count it when the queue is full."""
        pending = self._pending
        self._pending = ([], [], [], [], [])
        rows = sum(map(len, pending[2]))
        with self._lock:
            full = self._queued + rows > MAX_QUEUED_ROWS
            if not full:
                self._queued += rows
                self._queue.append((pending, wall_offset))
        if full:
            self.counted("dropped", rows)

    def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued, close the open file (it becomes visible), stop the thread."""
        self._stop.set()
        self._thread.join(timeout_s)

    # -- the writer thread ----------------------------------------------------------------------

    def _run(self) -> None:
        stopping = False
        while not stopping:
            stopping = self._stop.wait(WRITE_EVERY_S)
            with self._lock:
                items, self._queue = self._queue, []
                rows, self._queued = self._queued, 0
            if items:
                try:
                    self._write(items)
                except Exception:
                    log.exception("payload log: %d rows not written", rows)
                    self.counted("failed", rows)
            if self._file is not None and time.monotonic() - self._file.opened >= ROTATE_S:
                self._close_file()
        self._close_file()

    def _write(self, items: list[tuple[tuple[list, ...], float]]) -> None:
        """``items``: what :meth:`submit` queued, ``(pending lists, wall_offset)``."""
        table = self._table(items)
        if table is None:
            return
        days = (table[PAYLOAD_SERVED_AT] // _DAY_S).astype(np.int64)
        unique = np.unique(days)
        for day in unique:
            part = {k: v[days == day] for k, v in table.items()} if len(unique) > 1 else table
            rows = len(part[PAYLOAD_SERVED_AT])
            per_row = _estimate(part) / rows
            written = self._day_bytes.get(int(day), 0.0)
            room = max(0, int((self.max_day_bytes - written) // per_row))
            if room < rows:  # the day's cap: the rest of the day's rows are dropped
                self.counted("dropped", rows - room)
                rows = room
            start = 0
            while start < rows:
                if self._file is not None and self._file.day != day:
                    self._close_file()
                if self._file is None:
                    self._file = self._open(int(day))
                take = max(1, int((self.max_file_bytes - self._file.size) // per_row))
                chunk = {k: v[start : min(start + take, rows)] for k, v in part.items()}
                written += self._file.add(chunk)
                self.counted("written", len(chunk[PAYLOAD_SERVED_AT]))
                start += take
                if self._file.size >= self.max_file_bytes:
                    self._close_file()
            self._day_bytes = {int(day): written}

    def _table(self, items: list[tuple[tuple[list, ...], float]]) -> dict[str, np.ndarray] | None:
        """The answers as columns (answers whose rows and predictions disagree are counted
        as failed)."""
        width = len(self.columns)
        ids, rows, predictions, seconds, ends, offsets = ([] for _ in range(6))
        for (i, r, p, s, e), offset in items:
            ids += i
            rows += r
            predictions += p
            seconds += s
            ends += e
            offsets += [offset] * len(i)
        counts = np.array([len(p) for p in predictions], dtype=np.int64)
        sizes = np.array([len(r) // 8 if type(r) is bytes else r.size for r in rows], np.int64)
        good = (sizes == counts * width) & (counts > 0)
        if not good.all():
            self.counted("failed", int(counts[~good].sum()))
            keep = np.flatnonzero(good)
            ids, rows, predictions, seconds, ends, offsets = (
                [column[k] for k in keep]
                for column in (ids, rows, predictions, seconds, ends, offsets)
            )
            counts = counts[good]
        if not len(counts):
            return None
        if all(type(r) is bytes for r in rows):
            matrix = np.frombuffer(b"".join(rows)).reshape(-1, width)
        else:
            flat = [
                np.frombuffer(r) if type(r) is bytes else np.asarray(r, np.float64) for r in rows
            ]
            matrix = np.concatenate([f.reshape(-1) for f in flat]).reshape(-1, width)
        starts = np.repeat(np.cumsum(counts) - counts, counts)
        table = {name: matrix[:, j] for j, name in enumerate(self.columns)}
        table[PREDICTION_COLUMN] = np.concatenate(predictions, dtype=np.float64).reshape(-1)
        table[PAYLOAD_REQUEST_ID] = np.repeat(np.array(ids, dtype=object), counts)  # bytes
        table[PAYLOAD_ROW] = np.arange(len(starts), dtype=np.int64) - starts
        table[PAYLOAD_VERSION] = np.full(len(starts), self.version.encode(), dtype=object)
        table[PAYLOAD_LATENCY_MS] = np.repeat(np.array(seconds) * 1000.0, counts)
        table[PAYLOAD_SERVED_AT] = np.repeat(np.array(ends) + np.array(offsets), counts)
        return table

    def _open(self, day: int) -> _File:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        name = f"{self._name}-{stamp}-{time.monotonic_ns() % 1_000_000:06d}.{self.format}"
        folder = f"{self._root}/date={time.strftime('%Y-%m-%d', time.gmtime(day * _DAY_S))}"
        if self._fs is None:
            os.makedirs(folder, exist_ok=True)
            spool = f"{folder}/.{name}.tmp"  # hidden: readers skip it
        else:
            spool = os.path.join(self._spool, name)
        cls = _ParquetFile if self.format == "parquet" else _JsonlFile
        return cls(day, spool, f"{folder}/{name}")

    def _close_file(self) -> None:
        file, self._file = self._file, None
        if file is None:
            return
        try:
            file.close()
            if self._fs is None:
                os.replace(file.spool, file.final)
            else:
                self._fs.makedirs(file.final.rsplit("/", 1)[0], exist_ok=True)
                self._fs.put_file(file.spool, file.final)
                os.unlink(file.spool)
        except Exception:
            log.exception("payload log: %s could not be closed", file.final)
            self.counted("failed", file.rows)


class _File:
    def __init__(self, day: int, spool: str, final: str) -> None:
        self.day = day
        self.spool = spool
        self.final = final
        self.opened = time.monotonic()
        self.size = 0.0
        self.rows = 0

    def add(self, table: dict[str, np.ndarray]) -> float:
        """Append the rows; returns the bytes they add (an estimate for Parquet)."""
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


class _JsonlFile(_File):
    """JSON lines, appended as they come (no pyarrow needed)."""

    def __init__(self, day: int, spool: str, final: str) -> None:
        super().__init__(day, spool, final)
        self._handle = open(spool, "wb")  # noqa: SIM115 - closed in close()

    def add(self, table: dict[str, np.ndarray]) -> float:
        names = list(table)
        columns = [table[n].tolist() for n in names]
        for n in (PAYLOAD_REQUEST_ID, PAYLOAD_VERSION):  # bytes: orjson writes str
            columns[names.index(n)] = [b.decode() for b in columns[names.index(n)]]
        rows = zip(*columns, strict=True)
        data = b"".join(dumps(dict(zip(names, row, strict=True))) + b"\n" for row in rows)
        self._handle.write(data)
        self.size += len(data)
        self.rows += len(columns[0])
        return len(data)

    def close(self) -> None:
        self._handle.close()


class _ParquetFile(_File):
    """Parquet, written whole when the file closes: the rows wait in memory as columns
    (``max_file_mb`` bounds them; the size counted is the columns' in memory)."""

    def __init__(self, day: int, spool: str, final: str) -> None:
        super().__init__(day, spool, final)
        self._parts: list[dict[str, np.ndarray]] = []

    def add(self, table: dict[str, np.ndarray]) -> float:
        self._parts.append(table)
        added = _estimate(table)
        self.size += added
        self.rows += len(table[PAYLOAD_SERVED_AT])
        return added

    def close(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        names = list(self._parts[0])
        columns = {n: np.concatenate([p[n] for p in self._parts]) for n in names}
        table = pa.table(
            {
                n: pa.array(v, pa.binary()).cast(pa.string()) if v.dtype == object else v
                for n, v in columns.items()
            }
        )
        # Dictionary encoding only where values repeat: on every column it took 10x the time.
        pq.write_table(table, self.spool, use_dictionary=[PAYLOAD_VERSION])
        self._parts = []


def _estimate(table: dict[str, np.ndarray]) -> float:
    """Bytes of ``table``'s rows: the columns in memory plus the strings' bytes."""
    return sum(v.nbytes for v in table.values()) + len(table[PAYLOAD_SERVED_AT]) * 40.0


def request_id_factory() -> Callable[[], bytes]:
    """Request ids unique across processes and pods without a per-request syscall: a random
    per-process prefix and a counter (``3f9c0a1be2d4-1a``)."""
    prefix = os.urandom(6).hex().encode()
    counter = iter(range(1, 1 << 62))
    return lambda: b"%s-%x" % (prefix, next(counter))


def accepted_request_id(value: bytes) -> bool:
    """A caller's ``X-Request-Id`` is kept when it is 1-128 visible ASCII characters."""
    return 0 < len(value) <= 128 and value.isascii() and all(32 < c < 127 for c in value)


__all__ = [
    "MAX_QUEUED_ROWS",
    "ROTATE_S",
    "PayloadLog",
    "accepted_request_id",
    "default_format",
    "request_id_factory",
]
