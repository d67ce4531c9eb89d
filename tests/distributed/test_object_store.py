"""The object store (a real MinIO) holds what the distributed shape shares: the data partitions,
streamed from ``s3://`` exactly as from a folder, and MLflow's artifacts, through the MLflow
server's S3 artifact repository (its clients hold no S3 credential)."""

from __future__ import annotations

import os
import uuid
from datetime import date

import numpy as np
import pytest

from ml import data, pipeline, stream, synthetic
from ml.settings import DataSettings, with_overrides
from tests.conftest import free_port

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

    schema = data.load_schema(bucket)
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


def test_mlflow_keeps_its_artifacts_in_the_object_store(object_store, tmp_path, monkeypatch):
    """`mlflow server --artifacts-destination s3://…` as the distributed stack runs it: the
    server has the store's credentials (MLflow's own variables), the client has none."""
    import httpx
    import mlflow

    from scripts.stack import mlflow_server_argv
    from scripts.stacklib.processes import spawn
    from serving.deploy.local import stop_group, wait_for

    prefix = f"mlflow-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
    env |= object_store.client_env() | {
        "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    }
    argv = mlflow_server_argv(f"s3://pipeline/{prefix}", port)
    proc = spawn(argv, env, tmp_path / "mlflow.log")
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            assert proc.poll() is None, (tmp_path / "mlflow.log").read_text()[-3000:]
            try:
                return httpx.get(f"{url}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        assert wait_for(healthy, 180, 0.5)
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            monkeypatch.delenv(key)
        mlflow.set_tracking_uri(url)
        mlflow.set_experiment("object-store")
        with mlflow.start_run() as run:
            mlflow.log_dict({"rows": 3}, "evaluation/summary.json")
        assert mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/evaluation/summary.json") == {
            "rows": 3
        }
        keys = [
            o["Key"]
            for o in object_store.client().list_objects_v2(Bucket="pipeline", Prefix=prefix)[
                "Contents"
            ]
        ]
        assert any(k.endswith(f"{run.info.run_id}/artifacts/evaluation/summary.json") for k in keys)
    finally:
        mlflow.set_tracking_uri(None)
        stop_group(proc.pid, timeout_s=20)
