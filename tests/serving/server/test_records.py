"""What the request path records becomes metric updates in batches (``serving.server.records``):
when 256 requests are waiting, or once the timer the first of them set has run out."""

from __future__ import annotations

import asyncio

from serving.server.logs import AccessLog
from serving.server.metrics import ServerMetrics
from serving.server.records import FLUSH_S, MAX_RECORDS, Recorder

ROUTES = {"/invocations": "/invocations"}


def _record() -> tuple:
    return (0.0, 0.001, "POST", "/invocations", 200, 10, 20, ("127.0.0.1", 1), 1, None, 1)


def _counted(metrics: ServerMetrics) -> float:
    for line in metrics.render().decode().splitlines():
        if line.startswith("model_server_requests_total{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_records_are_counted_when_enough_wait_or_when_the_timer_runs_out():
    async def scenario():
        loop = asyncio.get_running_loop()
        metrics = ServerMetrics(routes=ROUTES)
        recorder = Recorder(metrics, AccessLog(enabled=False))
        for _ in range(MAX_RECORDS - 1):
            recorder.request_done(_record(), loop)
        waiting = (_counted(metrics), recorder.flush_handle is not None)
        recorder.request_done(_record(), loop)
        full = (_counted(metrics), recorder.flush_handle is None)
        recorder.request_done(_record(), loop)
        await asyncio.sleep(FLUSH_S * 2)
        timed = (_counted(metrics), recorder.flush_handle is None)
        return waiting, full, timed

    waiting, full, timed = asyncio.run(scenario())
    assert waiting == (0.0, True)  # nothing counted yet; a flush is due
    assert full == (MAX_RECORDS, True)
    assert timed == (MAX_RECORDS + 1, True)
