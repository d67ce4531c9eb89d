"""Live quality (``ml.quality``), the pure parts and the files: the server's payload log read
back (both formats), labels joined on (request_id, row), errors per served version and per
day, when N days above the gate's bar ask for a retraining, which versions would have beaten
the champion, and the synthetic source's delayed labels."""

from __future__ import annotations

import time
from datetime import UTC, date, datetime, timedelta

import numpy as np
import pandas as pd
import pytest

from ml.quality import (
    DAY,
    breached,
    daily_rmse,
    deliver_synthetic_labels,
    join_labels,
    live_errors,
    read_days,
    suggestions,
)
from ml.schema import SYNTHETIC_FEATURES
from ml.settings import DataSettings, QualitySettings
from serving.server.payload import PayloadLog

FEATURES = list(SYNTHETIC_FEATURES)


def _served(ids, rows=None, predictions=None, version="3", day=date(2026, 3, 1)):
    n = len(ids)
    return pd.DataFrame(
        {
            "request_id": ids,
            "row": rows if rows is not None else [0] * n,
            "prediction": predictions if predictions is not None else [10.0] * n,
            "model_version": version,
            DAY: day,
        }
    )


def test_labels_join_on_request_and_row():
    served = pd.concat(
        [_served(["a", "b", "b"], rows=[0, 0, 1]), _served(["dup", "dup"], rows=[0, 0])]
    )
    labels = pd.DataFrame(
        {
            "request_id": ["a", "b", "b", "b", "dup", "nobody", "c"],
            "row": [0, 0, 1, 1, 0, 0, 0],
            "target": [11.0, 12.0, 1.0, 13.0, 5.0, 7.0, np.nan],
        }
    )
    joined, counts = join_labels(served, labels, "target")
    keys = zip(joined["request_id"], joined["row"], strict=True)
    got = dict(zip(keys, joined["target"], strict=True))
    # b/1 was labelled twice: the last label; dup was served twice (a reused request id): out
    assert got == {("a", 0): 11.0, ("b", 0): 12.0, ("b", 1): 13.0}
    assert counts == {"served": 5, "labels": 7, "labelled": 3, "ambiguous": 2}


def test_a_label_without_row_is_for_row_zero():
    joined, _ = join_labels(
        _served(["a", "a"], rows=[0, 1]),
        pd.DataFrame({"request_id": ["a"], "target": [1.0]}),
        "target",
    )
    assert joined["row"].tolist() == [0]


def test_errors_per_served_version_and_per_day():
    day1, day2 = date(2026, 3, 1), date(2026, 3, 2)
    served = pd.concat(
        [
            _served(["a", "b"], predictions=[10.0, 10.0], version="3", day=day1),
            _served(["c", "d"], predictions=[10.0, 14.0], version="3", day=day2),
            _served(["e"], predictions=[9.0], version="4", day=day2),
        ]
    )
    labels = pd.DataFrame({"request_id": list("abcde"), "target": [11.0, 9.0, 10.0, 10.0, 9.0]})
    joined, _ = join_labels(served, labels, "target")
    live = live_errors(joined, "target")
    assert live["3"] == {"rows": 4, "rmse": pytest.approx(np.sqrt(18 / 4)), "mae": 1.5}
    assert live["4"] == {"rows": 1, "rmse": 0.0, "mae": 0.0}
    assert daily_rmse(joined, "target", "3") == [
        (str(day1), 2, pytest.approx(1.0)),
        (str(day2), 2, pytest.approx(np.sqrt(8))),
    ]
    assert (
        live_errors(pd.DataFrame(), "target") == {} and daily_rmse(pd.DataFrame(), "t", "3") == []
    )


@pytest.mark.parametrize(
    ("daily", "expected"),
    [
        ([("d1", 100, 4.0), ("d2", 100, 3.5)], True),
        ([("d1", 100, 4.0), ("d2", 100, 2.5)], False),  # the newest day is fine again
        ([("d1", 100, 4.0), ("d2", 100, 4.0), ("d3", 10, 1.0)], True),  # d3: too few rows
        ([("d1", 100, 4.0)], False),  # one judged day of the two needed
        ([("d1", 100, 2.0), ("d2", 100, 4.0), ("d3", 100, 3.1)], True),
        ([("d1", 100, 3.0), ("d2", 100, 3.0)], False),  # at the bar is not above it
    ],
)
def test_retrain_when_each_of_the_newest_judged_days_is_above_the_bar(daily, expected):
    retrain, why = breached(daily, bar=3.0, days=2, min_rows=50)
    assert retrain is expected, why


def test_a_version_is_suggested_only_clearly_below_the_champion():
    scores = {"5": 2.0, "6": 1.97, "7": 1.5, "8": float("nan"), "9": 3.0}
    assert suggestions(scores, "5", margin=0.02) == {"6": False, "7": True, "9": False}


@pytest.mark.parametrize("file_format", ["parquet", "jsonl"])
def test_the_servers_payload_log_reads_back_with_its_labels(tmp_path, file_format):
    """What serving.server.payload writes (the full image: Parquet; the slim one: JSON lines)
    is what ml.quality reads; hidden files in progress are not read."""
    log = PayloadLog(str(tmp_path / "log"), 100, FEATURES, "3", file_format=file_format)
    now = time.perf_counter()
    row = [10.0, 60.0, 8.0, 0.0, 3.0, 200.0]
    log.add(b"42", [row], np.array([31.0]), 0.002, now)
    log.add(b"x-1", np.array([row, row], dtype=np.float32), np.array([30.0, 32.0]), 0.001, now)
    log.submit(time.time() - now)
    log.close()
    (tmp_path / "log" / f"date={datetime.now(UTC).date()}" / ".payload-half.jsonl.tmp").write_text(
        "{"
    )
    today = datetime.now(UTC).date()
    payload = read_days(str(tmp_path / "log"), [today - timedelta(days=1), today])
    assert sorted(payload["request_id"]) == ["42", "x-1", "x-1"]  # "42" stays a string
    assert set(payload.columns) >= {*FEATURES, "prediction", "row", "model_version", DAY}
    labels = pd.DataFrame({"request_id": ["42", "x-1"], "row": [0, 1], "target": [30.0, 33.0]})
    joined, counts = join_labels(payload, labels, "target")
    assert counts["labelled"] == 2
    assert live_errors(joined, "target")["3"]["mae"] == 1.0


def test_synthetic_labels_arrive_late_once_and_follow_the_drift(tmp_path):
    served_day = date(2026, 3, 10)
    quality = QualitySettings(
        payload_path=str(tmp_path / "log"), labels_path=str(tmp_path / "labels"), label_delay_days=1
    )

    def logged(day: date, file: str, frame: pd.DataFrame) -> None:
        folder = tmp_path / "log" / f"date={day}"
        folder.mkdir(parents=True, exist_ok=True)
        frame.assign(request_id=[f"r{i}" for i in range(len(frame))], row=0).to_parquet(
            folder / file
        )

    from ml.synthetic import synthetic_partition

    data = DataSettings(synthetic_rows_per_day=300)
    rows = synthetic_partition(served_day, data)[FEATURES]
    logged(served_day, "payload-a.parquet", rows)
    arrival = served_day + timedelta(days=1)
    assert deliver_synthetic_labels(data, quality, [served_day]) == []  # not arrived yet
    (written,) = deliver_synthetic_labels(data, quality, [served_day, arrival])
    assert f"date={arrival}" in written
    assert deliver_synthetic_labels(data, quality, [arrival]) == []  # once
    labels = read_days(quality.labels_path, [arrival])
    assert len(labels) == 300 and set(labels.columns) >= {"request_id", "row", "target"}
    truth = synthetic_partition(served_day, data)["target"]
    assert abs(labels["target"].mean() - truth.mean()) < 1.0  # the same relationship
    drifted = data.model_copy(
        update={"synthetic_drift_start": served_day, "synthetic_drift_strength": 1.0}
    )
    logged(served_day, "payload-b.parquet", rows)
    deliver_synthetic_labels(drifted, quality, [arrival])
    by_file = read_days(quality.labels_path, [arrival])["target"].to_numpy().reshape(2, 300)
    assert by_file[1].mean() > by_file[0].mean() + 4.0  # base load +5 and more heating
