"""The server's logs: JSON lines on stderr (:func:`configure_logging`), and the access log,
JSON lines on stdout written in batches from the requests the app recorded (:class:`AccessLog`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from serving.server.jsoncodec import dumps


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, message (+ exc)."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    for noisy in ("absl", "tensorflow", "h5py", "urllib3", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


class _UtcClock:
    """ISO 8601 UTC with milliseconds, like ``datetime.fromtimestamp(t, UTC).isoformat(...)``,
    with the seconds part formatted once per second."""

    __slots__ = ("_second", "_text")

    def __init__(self) -> None:
        self._second = -1
        self._text = b""

    def format(self, now: float) -> bytes:
        second = int(now)
        if second != self._second:
            self._second = second
            self._text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)).encode()
        return b"%s.%03d+00:00" % (self._text, int((now - second) * 1000))


class AccessLog:
    """JSON access lines on stdout, one per request, written in batches.

    The request path only records a tuple per request (``serving.server.app.ScoringApp``);
    the lines are formatted here, all at once, when the server drains its records (at least
    every 0.25 s). ``known``: the methods and paths to keep quoted once, not per line.
    """

    def __init__(self, enabled: bool, known: Iterable[str] = ()) -> None:
        self.enabled = enabled
        self._fd = sys.stdout.fileno() if enabled else -1
        self._clock = _UtcClock()
        self._quoted = {k: json.dumps(k).encode() for k in known}
        self._last_client: Any = None
        self._last_client_json = b"null"

    def write_records(self, records: list[tuple], wall_offset: float) -> None:
        """One line per record: ts, method, path, status, duration_ms, bytes_in, bytes_out,
        client (+ rows, error_code). ``wall_offset``: time.time() - time.perf_counter()."""
        clock = self._clock
        quoted = self._quoted
        lines = []
        for end, seconds, method, path, status, b_in, b_out, client, rows, error, _ in records:
            if client is not self._last_client:
                self._last_client = client
                self._last_client_json = dumps(client[0] if client else None)
            extra = b""
            if rows:
                extra = b',"rows":%d' % rows
            if error:
                extra += b',"error_code":' + dumps(error)
            lines.append(
                b'{"ts":"%s","method":%s,"path":%s,"status":%d,"duration_ms":%.3f,'
                b'"bytes_in":%d,"bytes_out":%d,"client":%s%s}\n'
                % (
                    clock.format(end + wall_offset),
                    quoted.get(method) or dumps(method),
                    quoted.get(path) or dumps(path),
                    status,
                    seconds * 1000.0,
                    b_in,
                    b_out,
                    self._last_client_json,
                    extra,
                )
            )
        self._write(b"".join(lines))

    def _write(self, data: bytes) -> None:
        try:
            while data:
                written = os.write(self._fd, data)
                data = data[written:]
        except OSError:
            pass
