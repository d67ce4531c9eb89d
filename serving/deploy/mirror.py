"""The shadow's mirror in the local front proxy: sampled live requests sent again to the
candidate, after the caller has the live answer, never in any caller's way.

Each mirrored request carries the live answer in
:data:`~serving.server.contract.LIVE_ANSWER_HEADER` (the candidate records the paired
differences: ``serving.server.shadow``). At most :data:`MIRROR_CONNECTIONS` mirrored requests
are in flight and :data:`MIRROR_QUEUE` wait; more, or while the candidate does not answer, are
dropped: a dead or slow shadow changes nothing for callers.

Mirrored requests are merged: consecutive single-table requests
(``{"dataframe_split": {"columns": ..., "data": ...}}``, the same columns) whose live answers
are ``{"predictions": [...]}`` with one value per row go to the candidate as one request of
their rows (at most :data:`MIRROR_BATCH_ROWS`), with the live predictions in the same order in
the header, sent when it is full or :data:`MIRROR_WAIT_S` after its first row. The candidate's
paired differences and prediction histograms count rows, so they
are the same either way; what changes is the cost: one HTTP exchange and one model call for the
candidate instead of one per request, which is what lets a 100% shadow run beside the live
version on the same cores (docs/benchmarks.md). A request that waited alone, or that cannot be
merged, is sent as it came.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httptools

from serving.deploy.supervisor import UPSTREAM_HOST
from serving.server.contract import LIVE_ANSWER_HEADER, MIRRORED_REQUESTS_HEADER
from serving.server.jsoncodec import DecodeError, dumps, loads

log = logging.getLogger("serving.proxy")

MIRROR_CONNECTIONS = 2
# Requests (merged or not) waiting for a mirror connection; more are dropped.
MIRROR_QUEUE = 256
# A merged mirror request's rows at most (= the model server's default max_batch_rows).
MIRROR_BATCH_ROWS = 256
# ... and the request bodies it merges, in bytes at most: well under what a model server takes
# (--max-request-bytes, 16 MiB by default), so wide rows are merged into more requests, never
# into one the candidate refuses (413) with all of their rows.
MIRROR_BATCH_BYTES = 1024 * 1024
# A live answer longer than this is not sent along with its mirror (no paired difference); a
# merged request's live predictions stay under it too.
MAX_LIVE_ANSWER_BYTES = 8192
# A table waits this long for more rows to share its request (nobody waits for a mirror).
MIRROR_WAIT_S = 0.05
# After the candidate refused a mirror connection, mirrored requests are dropped this long.
_MIRROR_BACKOFF_S = 1.0
_CONNECT_TIMEOUT_S = 5.0
_LIVE_HEADER = LIVE_ANSWER_HEADER.lower().encode()
_COUNT_HEADER = MIRRORED_REQUESTS_HEADER.lower().encode()
_TABLE_PREFIX = b'{"dataframe_split"'
_PREDICTIONS_PREFIX = b'{"predictions"'


class _Batch:
    """Mirrored requests of one table shape waiting together: their rows and live answers."""

    __slots__ = ("body_bytes", "columns", "first", "live_bytes", "predictions", "requests", "rows")

    def __init__(self, columns: tuple[str, ...], first: bytes) -> None:
        self.columns, self.first = columns, first
        self.rows: list[Any] = []
        self.predictions: list[Any] = []
        self.live_bytes = self.body_bytes = self.requests = 0

    def add(self, rows: list[Any], predictions: list[Any], live: bytes, body: int) -> None:
        self.rows += rows
        self.predictions += predictions
        self.live_bytes += len(live)
        self.body_bytes += body
        self.requests += 1

    def fits(self, columns: tuple[str, ...], rows: int, live: int, body: int) -> bool:
        return (columns == self.columns and len(self.rows) + rows <= MIRROR_BATCH_ROWS
                and self.live_bytes + live <= MAX_LIVE_ANSWER_BYTES
                and self.body_bytes + body <= MIRROR_BATCH_BYTES)  # fmt: skip

    def raw(self) -> bytes:
        """One request: the first one as it came when it is alone, else the rows merged."""
        if self.requests == 1:
            return self.first
        body = dumps({"dataframe_split": {"columns": list(self.columns), "data": self.rows}})
        live = dumps({"predictions": self.predictions})
        return (b"POST /invocations HTTP/1.1\r\nhost: shadow\r\ncontent-type: application/json"
                b"\r\ncontent-length: %d\r\n%s: %d\r\n%s: %s\r\n\r\n%s"
                % (len(body), _COUNT_HEADER, self.requests, _LIVE_HEADER, live, body))  # fmt: skip


def _table(body: bytes, live: bytes) -> tuple[tuple[str, ...], list[Any], list[Any]] | None:
    """(columns, rows, live predictions) of a request that can be merged, else ``None``."""
    if not (body.startswith(_TABLE_PREFIX) and live.startswith(_PREDICTIONS_PREFIX)):
        return None
    try:
        request, answer = loads(body), loads(live)
    except DecodeError:
        return None
    if len(request) != 1 or len(answer) != 1:
        return None
    table, predictions = request["dataframe_split"], answer["predictions"]
    if not isinstance(table, dict) or set(table) != {"columns", "data"}:
        return None
    columns, rows = table["columns"], table["data"]
    if (not isinstance(columns, list) or not all(isinstance(c, str) for c in columns)
            or not isinstance(rows, list) or not isinstance(predictions, list)
            or not rows or len(rows) != len(predictions)):  # fmt: skip
        return None
    return tuple(columns), rows, predictions


class Mirror:
    """Sends sampled requests again to the candidate on ``port()`` (``None``: no candidate)."""

    def __init__(self, port: Callable[[], int | None], spawn: Callable[[Any], None]) -> None:
        self._candidate_port, self._spawn = port, spawn
        self.queue: deque[bytes | _Batch] = deque()
        self.port: int | None = None
        self.connections: set[_MirrorConnection] = set()
        self.idle: list[_MirrorConnection] = []
        self.connecting = 0
        self.paused_until = 0.0
        self.sent = self.dropped = 0
        self._timer: asyncio.TimerHandle | None = None

    def submit(self, head: bytes, body: bytes, live: bytes) -> None:
        """Mirror one request (``head``: its request line and header lines, without the empty
        line that ends them) that the live version answered with ``live``."""
        port = self._candidate_port()
        if port is None or time.monotonic() < self.paused_until:
            self.dropped += 1
            return
        if port != self.port:
            self.reset(port)
        pairable = len(live) <= MAX_LIVE_ANSWER_BYTES and live.isascii() and b"\n" not in live
        table = _table(body, live) if pairable else None
        last = self.queue[-1] if self.queue else None
        if not (
            table
            and isinstance(last, _Batch)
            and last.fits(table[0], len(table[1]), len(live), len(body))
        ):
            if len(self.queue) >= MIRROR_QUEUE:
                self.dropped += 1
                return
            head += b"%s: %s\r\n\r\n" % (_LIVE_HEADER, live) if pairable else b"\r\n"
            if table is None:
                self.queue.append(head + body)
                self._dispatch()
                return
            last = _Batch(table[0], head + body)
            self.queue.append(last)
        last.add(table[1], table[2], live, len(body))
        if len(last.rows) >= MIRROR_BATCH_ROWS:
            self._dispatch()
        elif self._timer is None:  # the others wait a little for more rows
            self._timer = asyncio.get_running_loop().call_later(MIRROR_WAIT_S, self._due)

    def _due(self) -> None:
        self._timer = None
        self._dispatch()

    def _dispatch(self) -> None:
        while self.idle and self.queue:
            self._send(self.idle.pop(), self.queue.popleft())
        if self.queue and len(self.connections) + self.connecting < MIRROR_CONNECTIONS:
            self.connecting += 1
            self._spawn(self._connect(self.port))

    def _send(self, connection: _MirrorConnection, item: bytes | _Batch) -> None:
        self.sent += 1
        connection.send(item if isinstance(item, bytes) else item.raw())

    def reset(self, port: int | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for connection in list(self.connections):
            connection.transport.close()
        self.connections.clear()
        self.idle.clear()
        self.queue.clear()
        self.port = port

    async def _connect(self, port: int | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, connection = await asyncio.wait_for(
                loop.create_connection(lambda: _MirrorConnection(self), UPSTREAM_HOST, port),
                _CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            if port != self.port:  # the candidate changed meanwhile: not the new one's fault
                return
            log.warning("mirror to %s:%s failed (%s): dropping mirrored requests for "
                        "%.0fs", UPSTREAM_HOST, port, exc, _MIRROR_BACKOFF_S)  # fmt: skip
            self.dropped += len(self.queue)
            self.queue.clear()
            self.paused_until = time.monotonic() + _MIRROR_BACKOFF_S
            return
        finally:
            self.connecting -= 1
        if port != self.port:
            connection.transport.close()
            return
        self.connections.add(connection)
        self.ready(connection)

    def ready(self, connection: _MirrorConnection) -> None:
        if self.queue:
            self._send(connection, self.queue.popleft())
        else:
            self.idle.append(connection)

    def gone(self, connection: _MirrorConnection) -> None:
        self.connections.discard(connection)
        with contextlib.suppress(ValueError):
            self.idle.remove(connection)


class _MirrorConnection(asyncio.Protocol):
    def __init__(self, mirror: Mirror) -> None:
        self.mirror = mirror
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser: httptools.HttpResponseParser | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, raw: bytes) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport.write(raw)

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserError:
            self.transport.close()

    def on_message_complete(self) -> None:
        if self.parser is not None and self.parser.should_keep_alive():
            self.mirror.ready(self)
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.mirror.gone(self)
