"""The object store (a real MinIO) holds the data partitions of the distributed shape: streamed
from ``s3://`` exactly as from a folder. (MLflow's artifacts there: tests/distributed/
test_celery.py, whose MLflow server keeps them in the same kind of store.)"""

from __future__ import annotations

import uuid
from datetime import date

import numpy as np
import pytest

from ml import data, pipeline, stream, synthetic
from ml.schema import load_schema
from ml.settings import DataSettings, with_overrides

pytestmark = [pytest.mark.distributed, pytest.mark.integration]

END = date(2026, 3, 8)


def _rows(source: stream.Source) -> np.ndarray:
    return np.concatenate([values for values, _ in source.batches()])


def test_partitions_in_the_object_store_stream_exactly_as_a_folder(s3_env, tmp_path):
    import fsspec

    folder = DataSettings(path=str(tmp_path / "data"), synthetic_rows_per_day=300)
    bucket = with_overrides(folder, path=f"s3://pipeline/stream-{uuid.uuid4().hex[:8]}")
    days = data.window_days(END, 7)
    synthetic.materialize_synthetic(folder, days)
    fs = fsspec.filesystem("s3")
    fs.put(f"{folder.path}/", bucket.path.removeprefix("s3://"), recursive=True)

    local, remote = (pipeline.load_window(s, END) for s in (folder, bucket))
    # What travels to the next task (XCom) is a URI every worker can open, and the data's
    # identity does not depend on where it lies.
    assert all(p["uri"].startswith(f"{bucket.path}/date=") for p in remote["partitions"])
    assert len(remote["partitions"]) == len(local["partitions"]) == 7
    assert remote["digest"] == local["digest"]
    checked = pipeline.validate_window(remote, bucket)
    assert checked["total_rows"] == pipeline.validate_window(local, folder)["total_rows"] == 2100

    schema = load_schema(bucket)
    sources = {}
    for name, settings, window in (("local", folder, local), ("s3", bucket, remote)):
        partitions = pipeline._partitions(window)
        sources[name] = {
            part: data.window_source(partitions, schema, settings, part)
            for part in ("train", "holdout")
        }
    for part in ("train", "holdout"):
        np.testing.assert_array_equal(_rows(sources["s3"][part]), _rows(sources["local"][part]))
    # An epoch of training batches: the same rows in the same order.
    prepared = {
        name: stream.prepare_training(s["train"], 0.15, 7, 10_000) for name, s in sources.items()
    }
    assert prepared["s3"].train_rows == prepared["local"].train_rows
    epochs = {
        name: list(stream.training_batches(s["train"], prepared[name], 7, 256)())
        for name, s in sources.items()
    }
    for (x1, y1), (x2, y2) in zip(epochs["s3"], epochs["local"], strict=True):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_the_synthetic_source_writes_its_partitions_to_the_object_store_once(s3_env):
    settings = DataSettings(
        path=f"s3://pipeline/synthetic-{uuid.uuid4().hex[:8]}",
        synthetic_rows_per_day=100,
        window_days=3,
    )
    days = data.window_days(END, 3)
    assert len(synthetic.materialize_synthetic(settings, days)) == 3
    assert synthetic.materialize_synthetic(settings, days) == []  # its listing is not stale
    window = pipeline.load_window(settings, END)
    assert [p["day"] for p in window["partitions"]] == [d.isoformat() for d in days]
