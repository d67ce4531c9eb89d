"""Batch scoring: a window of partitions scored by one version through the model server's own
compiled prediction path, after the live endpoint showed it answers that version's numbers.

``score_batch`` (dags/score_batch.py) resolves ``@champion`` once and calls, in order:

- :func:`compiled`: the version loaded by the server's loader (``serving.server.loader``: the
  LiteRT path, the frozen TensorFlow graph, or the pyfunc, exactly as the server chooses), as
  ``predict(float32 rows) -> float64``. It lives here, not in ``ml``: ``ml`` imports nothing
  of ``serving`` but the contract, and this module imports both.
- :func:`check_endpoint`: the version's verification rows (logged at evaluation,
  ``serving.deploy.verify.load_rows``) sent to the live endpoint; its answers, the compiled
  path's and the numbers logged with the version must agree (``verify.compare``'s tolerance),
  or :class:`~serving.deploy.target.VerificationFailed` and nothing is scored. An endpoint that
  serves another version (a rollout under way) is ``EndpointUnreachable``: retried.
- :func:`score_window`: the window's files streamed a record batch at a time
  (``ml.stream``, at most 65,536 rows in memory), each batch predicted and appended to its
  output file: ``<predictions path>/v<version>-<digest>/date=.../<input file>.parquet`` holds
  one ``prediction`` per input row in the input's order, written under a hidden name and
  renamed; ``_SUCCESS.json`` (version, input digest, window, rows, files, speed) comes last,
  and a run that finds it scores nothing again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from serving.deploy.target import EndpointUnreachable
from serving.deploy.verify import ATOL, Endpoint, as_array, check_answer, compare, load_rows

log = logging.getLogger(__name__)

SUCCESS_FILE = "_SUCCESS.json"
Predict = Callable[[np.ndarray], np.ndarray]


def compiled(model_uri: str) -> tuple[Predict, list[str], str]:
    """(predict, feature columns, serving path and engine) of ``model_uri`` as the model server
    loads it."""
    import pandas as pd

    from serving.server.loader import load_model

    model = load_model(model_uri, fast_path=True, slim=True, tf_threads=os.cpu_count() or 1)
    if model.fast is not None:
        path = f"{model.serving_path} ({model.fast.engine})"
        return model.fast.predict, list(model.fast.feature_columns), path
    schema = model.input_schema
    columns = schema.input_names() if schema is not None and schema.has_input_names() else []
    if not columns:
        raise ValueError(f"{model_uri} names no input columns: nothing to read from partitions")

    def predict(rows: np.ndarray) -> np.ndarray:
        frame = pd.DataFrame(np.asarray(rows, dtype=np.float64), columns=columns)
        return as_array(model.pyfunc.predict(frame))

    return predict, columns, model.serving_path


def check_endpoint(
    version: Mapping[str, Any],
    endpoint_url: str,
    predict: Predict,
    columns: list[str],
    *,
    tracking_uri: str,
) -> dict[str, Any]:
    """The version's verification rows: the endpoint's answers, the compiled path's and the
    logged numbers agree, or ``VerificationFailed`` (the first row that differs)."""
    rows = load_rows(version, tracking_uri=tracking_uri)
    number = str(version["version"])
    with Endpoint(endpoint_url, timeout_s=30.0) as endpoint:
        served = endpoint.served_version()
        if served != number:
            raise EndpointUnreachable(
                f"{endpoint.base} serves version {served or 'unknown'}, not {number}: the batch "
                "would not give the endpoint's numbers (a rollout under way?)"
            )
        answer = endpoint.invoke(rows.payload())
    # the endpoint against the logged numbers (its status too), then the batch path against both
    check_answer(answer, rows, atol=ATOL, what=f"version {number}")
    order = [rows.columns.index(c) for c in columns]
    local = predict(np.asarray(rows.data, dtype=np.float64)[:, order].astype(np.float32))
    logged_diff = compare(local, rows.expected, what=f"version {number}")
    endpoint_diff = compare(local, as_array(answer.json()["predictions"]), what="the endpoint")
    return {
        "endpoint": endpoint_url,
        "rows": len(rows.data),
        "rows_from": rows.source,
        "max_abs_diff_endpoint": endpoint_diff,
        "max_abs_diff_logged": logged_diff,
    }


def score_window(
    version: Mapping[str, Any],
    window: Mapping[str, Any],
    predict: Predict,
    columns: list[str],
    *,
    data_settings,
    predictions_path: str,
) -> dict[str, Any]:
    """Predict every row of ``window`` (``ml.pipeline.load_window``'s result) with
    ``predict``, streamed; write the predictions and ``_SUCCESS.json``; return its content."""
    import fsspec
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ml import stream

    fs, root = fsspec.core.url_to_fs(predictions_path)
    folder = f"{root.rstrip('/')}/v{version['version']}-{window['digest'][:16]}"
    done = f"{folder}/{SUCCESS_FILE}"
    fs.invalidate_cache()
    if fs.exists(done):
        with fs.open(done, "r") as handle:
            summary = json.load(handle)
        log.info("Already scored: %s (%s rows)", folder, summary["rows"])
        return summary | {"skipped": True}
    started = time.perf_counter()
    source = stream.WindowSource([p["uri"] for p in window["partitions"]], columns, data_settings)
    day_of = {p["uri"]: p["day"] for p in window["partitions"]}
    schema = pa.schema([("prediction", pa.float64())])
    files, rows = [], 0
    by_file: dict[str, list] = {}
    for fragment in source.fragments():  # in file order: a parquet file's row groups in a row
        by_file.setdefault(fragment.source, []).append(fragment)
    for uri, fragments in by_file.items():
        name = uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]
        target = f"{folder}/date={day_of[uri]}/{name}.parquet"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)
        # Not *.parquet until whole: a reader of the folder never sees half a file.
        with fs.open(f"{target}.tmp", "wb") as handle, pq.ParquetWriter(handle, schema) as out:
            for fragment in fragments:
                for values in source.read_raw(fragment, "float32"):
                    predictions = np.asarray(predict(values), dtype=np.float64).reshape(-1)
                    if len(predictions) != len(values):
                        raise ValueError(f"{len(predictions)} predictions for {len(values)} rows")
                    out.write_table(pa.table({"prediction": predictions}, schema=schema))
                    rows += len(values)
        fs.mv(f"{target}.tmp", target)
        files.append(target)
    seconds = time.perf_counter() - started
    summary = {
        "version": str(version["version"]),
        "model_uri": version["model_uri"],
        "input_digest": window["digest"],
        "window_start": window["start"],
        "window_end": window["end"],
        "rows": rows,
        "files": [fs.unstrip_protocol(f) if "://" in predictions_path else f for f in files],
        "output": fs.unstrip_protocol(folder) if "://" in predictions_path else folder,
        "seconds": round(seconds, 3),
        "rows_per_s": round(rows / seconds, 1) if seconds else None,
    }
    with fs.open(done, "w") as handle:
        json.dump(summary, handle)
    log.info("Scored %d rows with v%s in %.1f s: %s", rows, version["version"], seconds, folder)
    return summary


def record_run(
    summary: Mapping[str, Any],
    check: Mapping[str, Any],
    experiment: str,
    tracking_uri: str,
    tags: Mapping[str, str],
) -> str:
    """The batch run in MLflow (``<experiment>-batch``): what was scored, with what, where."""
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.tracking import MlflowClient
    from mlflow.utils.time import get_current_time_millis

    client = MlflowClient(tracking_uri)
    name = f"{experiment}-batch"
    found = client.get_experiment_by_name(name)
    experiment_id = found.experiment_id if found else client.create_experiment(name)
    run = client.create_run(
        experiment_id,
        run_name=f"score v{summary['version']} {summary['window_start']}..{summary['window_end']}",
    )
    now = get_current_time_millis()
    numbers = {k: summary.get(k) for k in ("rows", "seconds", "rows_per_s")}
    numbers |= {k: v for k, v in check.items() if k.startswith("max_abs_diff")}
    params = {k: str(summary[k]) for k in ("version", "model_uri", "input_digest", "output")}
    params |= {"window": f"{summary['window_start']}..{summary['window_end']}"}
    client.log_batch(
        run.info.run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in numbers.items() if v is not None],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, str(v)) for k, v in tags.items()],
    )
    client.log_dict(run.info.run_id, dict(summary), "batch/summary.json")
    client.set_terminated(run.info.run_id)
    return run.info.run_id
