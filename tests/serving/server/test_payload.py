"""The payload log (``serving.server.payload``) through the app with a stand-in model: every
answer names its request id, a sampled share of the answered rows lands in the pipeline's
daily partitions (Parquet, or JSON lines where pyarrow is missing), a writer that falls behind
drops and counts instead of holding a request, and files rotate and stay invisible until whole.
"""

from __future__ import annotations

import asyncio
import json
import random
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from serving.server import payload as payload_module
from serving.server.contract import (
    LIVE_ANSWER_HEADER,
    PAYLOAD_REQUEST_ID,
    PAYLOAD_ROW,
    PAYLOAD_SERVED_AT,
)
from serving.server.payload import PayloadLog
from tests.serving.server.asgi import FEATURES, SummingPyfunc, make_app, post, run, split


def _files(root: Path, suffix: str = "") -> list[Path]:
    return sorted(p for p in root.glob(f"date=*/*{suffix}") if not p.name.startswith("."))


def _read(root: Path) -> pd.DataFrame:
    frames = []
    for path in _files(root):
        if path.suffix == ".parquet":
            frames.append(pd.read_parquet(path))
        else:
            frames.append(
                pd.read_json(path, lines=True, dtype={PAYLOAD_REQUEST_ID: str}, convert_dates=False)
            )
    return pd.concat(frames, ignore_index=True)


async def _serve(app, bodies, headers=()):
    """POST each body; return the request ids answered; then shut the log down."""
    ids = []
    for body in bodies:
        status, answer_headers, _ = await post_with(app, json.dumps(body).encode(), headers)
        assert status == 200
        ids.append(answer_headers[b"x-request-id"].decode())
    app.recorder.stop()
    await asyncio.to_thread(app.payload_log.close)
    return ids


async def post_with(app, body: bytes, headers=(), content_type=b"application/json"):
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/invocations",
        "headers": [
            (b"content-type", content_type),
            (b"content-length", b"%d" % len(body)),
            *headers,
        ],
        "client": ("127.0.0.1", 1),
    }
    await app(scope, receive, send)
    start, answer = sent
    return start["status"], dict(start["headers"]), json.loads(answer["body"])


@pytest.mark.parametrize("file_format", ["parquet", "jsonl"])
def test_every_answered_row_is_logged_with_its_request_id(tmp_path, monkeypatch, file_format):
    monkeypatch.setattr(payload_module, "default_format", lambda: file_format)
    bodies = [split(data=[(1, 2, 3)]), split(data=[(1, 1, 1), (2, 2, 2), (0.5, 0, 0)])]

    async def scenario():
        app = make_app(payload_log_path=str(tmp_path), payload_log_sample_percent=100)
        return await _serve(app, bodies)

    ids = run(scenario())
    assert len(set(ids)) == 2
    files = _files(tmp_path)
    assert [p.suffix for p in files] == [f".{file_format}"]
    assert files[0].parent.name == time.strftime("date=%Y-%m-%d", time.gmtime())
    logged = _read(tmp_path).sort_values([PAYLOAD_REQUEST_ID, PAYLOAD_ROW])
    assert list(logged.columns[:4]) == [*FEATURES, "prediction"]
    by_id = {i: g for i, g in logged.groupby(PAYLOAD_REQUEST_ID)}
    assert by_id[ids[0]]["prediction"].tolist() == [6.0]
    assert by_id[ids[1]]["prediction"].tolist() == [3.0, 6.0, 0.5]
    assert by_id[ids[1]][PAYLOAD_ROW].tolist() == [0, 1, 2]
    assert by_id[ids[1]]["a"].tolist() == [1.0, 2.0, 0.5]
    assert set(logged["model_version"].astype(str)) == {"1"}
    assert (logged["latency_ms"] > 0).all()
    assert (abs(logged[PAYLOAD_SERVED_AT] - time.time()) < 60).all()


def test_a_callers_request_id_is_kept_and_a_bad_one_replaced(tmp_path):
    async def scenario():
        app = make_app(payload_log_path=str(tmp_path), payload_log_sample_percent=100)
        kept = await _serve_one(app, [(b"x-request-id", b"order-42")])
        replaced = await _serve_one(app, [(b"x-request-id", b"bad id with spaces")])
        app.recorder.stop()
        await asyncio.to_thread(app.payload_log.close)
        return kept, replaced

    async def _serve_one(app, headers):
        _, answer_headers, _ = await post_with(app, json.dumps(split()).encode(), headers)
        return answer_headers[b"x-request-id"].decode()

    kept, replaced = run(scenario())
    assert kept == "order-42"
    assert replaced != "bad id with spaces" and " " not in replaced
    assert set(_read(tmp_path)[PAYLOAD_REQUEST_ID]) == {"order-42", replaced}


def test_a_shadows_answer_to_a_mirrored_request_is_not_logged(tmp_path):
    """A request mirrored with the live answer (``X-Live-Answer``) reached no caller with this
    server's answer: the shadow measures it, the payload log leaves it out (the live server
    logged that request id already)."""
    live_answer = (LIVE_ANSWER_HEADER.lower().encode(), b'{"predictions": [6.0]}')

    async def scenario():
        app = make_app(payload_log_path=str(tmp_path), payload_log_sample_percent=100)
        mirrored = [(b"x-request-id", b"order-7"), live_answer]
        _, headers, _ = await post_with(app, json.dumps(split()).encode(), mirrored)
        assert headers[b"x-request-id"] == b"order-7"
        return await _serve(app, [split()], [(b"x-request-id", b"order-8")])

    assert run(scenario()) == ["order-8"]
    assert set(_read(tmp_path)[PAYLOAD_REQUEST_ID]) == {"order-8"}


def test_answers_carry_a_request_id_with_the_log_off():
    async def scenario():
        app = make_app()
        return [await post(app, [(0, json.dumps(split()).encode())]) for _ in range(3)]

    answers = run(scenario())
    ids = {headers[b"x-request-id"] for _, headers, _ in answers}
    assert len(ids) == 3


def test_the_reference_path_is_logged_too(tmp_path):
    """A CSV body (MLflow's parser, the pyfunc) is logged like a fast-path answer."""

    async def scenario():
        app = make_app(
            fast=False,
            pyfunc=SummingPyfunc(),
            payload_log_path=str(tmp_path),
            payload_log_sample_percent=100,
        )
        status, _, body = await post_with(app, b"a,b,c\n1,2,3\n4,5,6\n", content_type=b"text/csv")
        app.recorder.stop()
        await asyncio.to_thread(app.payload_log.close)
        return status, body

    status, body = run(scenario())
    assert status == 200, body
    assert _read(tmp_path)["prediction"].tolist() == [6.0, 15.0]


def test_a_sampled_share_is_logged(tmp_path):
    random.seed(7)

    async def scenario():
        app = make_app(payload_log_path=str(tmp_path), payload_log_sample_percent=10)
        return await _serve(app, [split()] * 1000)

    run(scenario())
    assert 60 <= len(_read(tmp_path)) <= 140


def _submit(log: PayloadLog, n: int, end: float, offset: float | None = None) -> None:
    """``n`` one-row answers ending at ``end`` (a perf_counter) handed to the writer."""
    for i in range(n):
        log.add(b"r%d" % i, [[1.0, 2.0, 3.0]], [6.0], 0.001, end + i * 1e-6)
    log.submit(time.time() - time.perf_counter() if offset is None else offset)


def test_a_writer_that_falls_behind_drops_and_counts_and_never_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(payload_module, "MAX_QUEUED_ROWS", 100)
    counts: dict[str, int] = {}
    release = threading.Event()
    log = PayloadLog(
        str(tmp_path),
        100,
        FEATURES,
        "1",
        counted=lambda outcome, rows: counts.__setitem__(outcome, counts.get(outcome, 0) + rows),
    )
    writes = log._write
    monkeypatch.setattr(log, "_write", lambda *a: (release.wait(), writes(*a)))
    started = time.monotonic()
    for _ in range(10):
        _submit(log, 30, time.perf_counter())
    took = time.monotonic() - started
    release.set()
    log.close()
    assert took < 0.5
    # 3 batches of 30 fit in 100 queued rows; while the writer is held, the others are dropped
    assert counts["dropped"] >= 200
    assert counts["written"] + counts["dropped"] == 300
    assert len(_read(tmp_path)) == counts["written"]


def test_files_rotate_at_their_size_and_days_split_at_midnight(tmp_path):
    """70 rows of 112 bytes as the size is counted (9 columns of 8 bytes, 40 for the strings)
    in 1 kB files: at most 8 rows a file."""
    log = PayloadLog(str(tmp_path), 100, FEATURES, "1", max_file_mb=0.001, file_format="jsonl")
    midnight = (int(time.time()) // 86_400) * 86_400
    offset = midnight - 1.0  # wall = perf + offset: 1 s before and after midnight
    _submit(log, 10, 0.5, offset)
    _submit(log, 10, 1.5, offset)
    for _ in range(5):
        _submit(log, 10, 1.6, offset)
    log.close()
    days = sorted({p.parent.name for p in _files(tmp_path)})
    assert days == [
        time.strftime("date=%Y-%m-%d", time.gmtime(midnight - 1)),
        time.strftime("date=%Y-%m-%d", time.gmtime(midnight)),
    ]
    sizes = [len(pd.read_json(path, lines=True)) for path in _files(tmp_path)]
    assert max(sizes) == 8 and len(sizes) >= 10
    assert len(_read(tmp_path)) == 70
    assert not list(tmp_path.glob("date=*/.*"))  # no spool file left behind


def test_a_day_over_its_cap_is_dropped_and_counted(tmp_path):
    counts: dict[str, int] = {}
    log = PayloadLog(
        str(tmp_path),
        100,
        FEATURES,
        "1",
        max_day_mb=0.002,
        file_format="jsonl",
        counted=lambda outcome, rows: counts.__setitem__(outcome, counts.get(outcome, 0) + rows),
    )
    for _ in range(20):
        _submit(log, 10, time.perf_counter())
    log.close()
    assert counts["dropped"] > 0 and counts["written"] + counts["dropped"] == 200
    assert len(_read(tmp_path)) == counts["written"]


def test_an_open_file_is_invisible_until_closed(tmp_path):
    log = PayloadLog(str(tmp_path), 100, FEATURES, "1", file_format="parquet")
    _submit(log, 5, time.perf_counter())
    deadline = time.monotonic() + 5
    while not list(tmp_path.glob("date=*/.*.tmp")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert _files(tmp_path) == []
    log.close()
    assert len(_read(tmp_path)) == 5


def test_an_object_store_url_gets_the_closed_files(tmp_path):
    log = PayloadLog(f"file://{tmp_path}/bucket", 100, FEATURES, "1", file_format="jsonl")
    _submit(log, 5, time.perf_counter())
    log.close()
    assert len(_read(tmp_path / "bucket")) == 5


def test_the_slim_image_writes_json_lines(monkeypatch):
    monkeypatch.setattr(payload_module.importlib.util, "find_spec", lambda name: None)
    assert payload_module.default_format() == "jsonl"


def test_what_waits_for_the_writer_is_untracked_and_a_bad_answer_is_counted(tmp_path):
    """Kept answers add no object the garbage collector tracks (each did: 3x the collections
    under load, docs/benchmarks.md); rows that do not fit the columns are counted, not
    written."""
    import gc

    counts: dict[str, int] = {}
    log = PayloadLog(
        str(tmp_path),
        100,
        FEATURES,
        "1",
        counted=lambda outcome, rows: counts.__setitem__(outcome, counts.get(outcome, 0) + rows),
    )
    log.add(b"a", [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], np.array([6.0, 15.0]), 0.001, 1.0)
    log.add(b"b", np.ones((1, 3), np.float32), np.array([3.0]), 0.001, 1.0)
    log.add(b"short", [[1.0, 2.0]], np.array([3.0]), 0.001, 1.0)
    assert not any(gc.is_tracked(item) for column in log._pending for item in column)
    log.submit(time.time())
    log.close()
    assert counts == {"written": 3, "failed": 1}
    assert sorted(_read(tmp_path)["prediction"]) == [3.0, 6.0, 15.0]
