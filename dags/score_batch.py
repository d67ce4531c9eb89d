"""
### score_batch

Scores a window of partitions with `@champion`, giving the numbers the live endpoint gives.

`resolve → check → score`

* **Schedule**: on every event of the `data/<model>` asset (new partitions landed:
  `train_and_deploy`'s `load_window` emits it for the synthetic source; whatever lands real
  data emits it), and from the trigger form (`data_end_date`, `batch_window_days`).
* **Window**: `batch_window_days` days of partitions ending (exclusive) at the `data_end_date`
  Param, else at the triggering event's window end, else at the run's date.
* **resolve**: `@champion` is read once; every later task scores with that version number.
* **check**: the version's 64 verification rows (logged at evaluation) go to the live
  endpoint; its answers, the batch's own predictions and the logged numbers must agree, or the
  run fails without retries and nothing is scored. An endpoint serving another version (a
  rollout under way) is retried.
* **score**: the model server's compiled prediction path (its loader: LiteRT, the frozen
  TensorFlow graph, or the pyfunc) over the window, streamed a record batch at a time;
  predictions under `PIPELINE_BATCH_PREDICTIONS_PATH/v<version>-<input digest>/`, one file per
  input file in its row order; an MLflow run in `<experiment>-batch`; an event on the
  `predictions/<model>` asset (version, input digest, where). A window already scored by the
  version is not scored again.

Every task is one call into `ml/` or `serving/`; see docs/operations.md, "Batch scoring".
"""

from __future__ import annotations

from datetime import date

import pendulum
from _params import (
    data_settings,
    deploy_settings,
    knob_params,
    reject_unknown_conf,
    run_settings,
    window_end,
    window_end_param,
)
from _support import (
    IO_TASK_DEFAULTS,
    data_asset,
    log,
    predictions_asset,
    registry_settings,
    run_tags,
    tracking_uri,
    triggering_events,
)
from airflow.sdk import dag, task
from airflow.sdk.exceptions import AirflowFailException

from ml.settings import BatchSettings

PREDICTIONS = predictions_asset()


@dag(
    dag_id="score_batch",
    schedule=data_asset(),
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=IO_TASK_DEFAULTS,
    params={"data_end_date": window_end_param(), **knob_params("batch_window_days")},
    tags=["ml", "batch", "mlflow"],
    doc_md=__doc__,
)
def score_batch():
    @task
    def resolve(**context) -> dict:
        reject_unknown_conf(context)
        from ml.pipeline import load_window
        from ml.registry import Registry
        from ml.settings import with_overrides

        params = context["params"]
        champion = Registry(tracking_uri(), registry_settings()).champion()
        if champion is None:
            raise AirflowFailException("no @champion: nothing to score with")
        ends = [e["end"] for e in triggering_events(context) if e.get("end")]
        end = window_end(context)
        if ends and not params.get("data_end_date"):
            end = date.fromisoformat(max(ends))
        days = run_settings(BatchSettings, params).window_days
        window = load_window(with_overrides(data_settings(params), window_days=days), end)
        log.info("Scoring %s..%s with @champion v%s", window["start"], end, champion.version)
        return {"version": champion.to_dict(), "window": window}

    @task
    def check(resolved: dict, **context) -> dict:
        from serving.deploy.batch import check_endpoint, compiled
        from serving.deploy.target import VerificationFailed

        version = resolved["version"]
        predict, columns, path = compiled(version["model_uri"])
        endpoint = deploy_settings(context["params"]).endpoint_url
        try:
            checked = check_endpoint(
                version, endpoint, predict, columns, tracking_uri=tracking_uri()
            )
        except VerificationFailed as exc:
            raise AirflowFailException(f"refused, nothing scored (not retried): {exc}") from exc
        log.info("%s answers v%s's numbers (%s): %s", endpoint, version["version"], path, checked)
        return checked | {"serving_path": path}

    @task(outlets=[PREDICTIONS])
    def score(resolved: dict, checked: dict, **context) -> dict:
        from serving.deploy.batch import compiled, record_run, score_window

        version, window = resolved["version"], resolved["window"]
        params = context["params"]
        predict, columns, _ = compiled(version["model_uri"])
        summary = score_window(
            version,
            window,
            predict,
            columns,
            data_settings=data_settings(params),
            predictions_path=run_settings(BatchSettings, params).predictions_path,
        )
        if not summary.get("skipped"):
            summary["run_id"] = record_run(
                summary,
                checked,
                registry_settings().experiment_name,
                tracking_uri(),
                run_tags(context),
            )
        keys = ("version", "input_digest", "output", "rows")
        context["outlet_events"][PREDICTIONS].extra = {k: summary[k] for k in keys}
        return summary

    resolved = resolve()
    score(resolved, check(resolved))


score_batch()
