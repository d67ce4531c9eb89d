"""Batch scoring (``serving.deploy.batch``) with a stand-in prediction path (fast: the real
model's path runs in tests/integration/test_score_batch.py): one prediction per input row in
its order, files whole or absent, a window scored once per version; and the check against a
scripted endpoint, which refuses on the first row that differs."""

from __future__ import annotations

import json
import threading
from datetime import date
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest

from serving.deploy import batch
from serving.deploy.target import EndpointUnreachable, VerificationFailed
from serving.deploy.verify import Rows

COLUMNS = ["temperature_c", "humidity_pct"]
VERSION = {"version": "7", "model_uri": "models:/m/7", "run_id": "r"}


def stand_in(rows: np.ndarray) -> np.ndarray:
    return rows.astype(np.float64) @ np.array([2.0, 0.5])


@pytest.fixture
def window(tmp_path):
    from ml import pipeline
    from ml.settings import DataSettings

    settings = DataSettings(path=str(tmp_path / "data"), synthetic_rows_per_day=150, window_days=2)
    return settings, pipeline.load_window(settings, date(2026, 3, 10))


def test_every_row_gets_its_prediction_in_order_once(window, tmp_path):
    settings, win = window
    out = str(tmp_path / "predictions")
    summary = batch.score_window(
        VERSION, win, stand_in, COLUMNS, data_settings=settings, predictions_path=out
    )
    assert summary["rows"] == 300 and len(summary["files"]) == 2
    assert summary["output"].endswith(f"v7-{win['digest'][:16]}")
    for partition, written in zip(win["partitions"], summary["files"], strict=True):
        assert f"date={partition['day']}" in written
        inputs = pd.read_parquet(partition["uri"])[COLUMNS].to_numpy(np.float32)
        np.testing.assert_array_equal(pd.read_parquet(written)["prediction"], stand_in(inputs))
    on_disk = json.loads((tmp_path / summary["output"] / "_SUCCESS.json").read_text())
    assert on_disk == summary and on_disk["input_digest"] == win["digest"]
    assert not list((tmp_path / "predictions").rglob("*.tmp"))

    def refuse(rows):
        raise AssertionError("scored twice")

    again = batch.score_window(
        VERSION, win, refuse, COLUMNS, data_settings=settings, predictions_path=out
    )
    assert again == summary | {"skipped": True}


def test_a_failure_leaves_no_file_a_reader_would_take(window, tmp_path):
    settings, win = window
    calls = []

    def fails_on_the_second_file(rows):
        calls.append(len(rows))
        if len(calls) == 2:
            raise RuntimeError("the model fell over")
        return stand_in(rows)

    with pytest.raises(RuntimeError):
        batch.score_window(
            VERSION,
            win,
            fails_on_the_second_file,
            COLUMNS,
            data_settings=settings,
            predictions_path=str(tmp_path / "p"),
        )
    written = sorted(p.name for p in (tmp_path / "p").rglob("*") if p.is_file())
    assert written == ["part-0.parquet", "part-0.parquet.tmp"]  # the first whole, no _SUCCESS


ROWS = Rows(
    columns=list(reversed(COLUMNS)),  # the logged order need not be the model's
    data=[[60.0, 10.0], [20.0, -5.5]],
    expected=np.array([50.0, -1.0]),  # stand_in's: 2 x temperature + humidity / 2
    source="logged with run r",
)


@pytest.fixture
def endpoint(monkeypatch):
    answer = {"version": "7", "predictions": ROWS.expected.tolist()}
    monkeypatch.setattr(batch, "load_rows", lambda version, tracking_uri: ROWS)

    class Handler(BaseHTTPRequestHandler):
        def _send(self, body: dict) -> None:
            raw = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

        def do_GET(self) -> None:
            self._send({"version": answer["version"]})

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers["Content-Length"]))
            self._send({"predictions": answer["predictions"]})

        def log_message(self, *args) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, args=(0.02,), daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", answer
    httpd.shutdown()
    httpd.server_close()


def test_the_endpoint_the_batch_path_and_the_logged_numbers_agree(endpoint):
    url, _ = endpoint
    checked = batch.check_endpoint(VERSION, url, stand_in, COLUMNS, tracking_uri="unused")
    assert checked["rows"] == 2 and checked["max_abs_diff_endpoint"] == 0.0


def test_a_batch_path_that_differs_is_refused(endpoint):
    url, _ = endpoint
    with pytest.raises(VerificationFailed, match="row 1"):
        batch.check_endpoint(
            VERSION,
            url,
            lambda r: stand_in(r) + np.array([0, 0.01]),
            COLUMNS,
            tracking_uri="unused",
        )


def test_an_endpoint_that_answers_otherwise_is_refused(endpoint):
    url, answer = endpoint
    answer["predictions"] = [50.0, -1.2]
    with pytest.raises(VerificationFailed, match="row 1"):
        batch.check_endpoint(VERSION, url, stand_in, COLUMNS, tracking_uri="unused")


def test_an_endpoint_serving_another_version_is_a_fault_not_a_verdict(endpoint):
    url, answer = endpoint
    answer["version"] = "8"  # a rollout under way: retried, nothing refused for good
    with pytest.raises(EndpointUnreachable, match="serves version 8, not 7"):
        batch.check_endpoint(VERSION, url, stand_in, COLUMNS, tracking_uri="unused")
