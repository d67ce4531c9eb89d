"""
### monitor_drift

Daily drift check of the newest data against what `@champion` was trained on; retrains on need.

`load_window → score → retrain_or_not → (retrain | no_drift)`

* **Window**: the newest `PIPELINE_DRIFT_WINDOW_DAYS` days of partitions ending (exclusive)
  at the run's data interval end, or at the `data_end_date` Param.
* **Score**: per column, the population stability index (PSI) of the window against the
  profile logged with `@champion`'s training run (features, target, and `@champion`'s own
  predictions). A column that went missing, all null or non-numeric is reported, not crashed
  on. Each check is an MLflow run in the `<experiment>-drift` experiment: `psi.<column>`
  metrics, `drift/report.json`, `drift/psi.png`.
* **Retrain**: when a column of a kind in `PIPELINE_DRIFT_TRIGGER_ON` (default: the target)
  passes its threshold, `retrain` emits an event on the `data-drift/<model>` asset, which
  `train_and_deploy` is scheduled on (besides its nightly cron); the reason travels in the
  event and is recorded on the training run and the version it produces. Otherwise the run
  ends at `no_drift` and nothing is triggered.

Every task is one call into `ml/`; thresholds are `PIPELINE_DRIFT_*` settings (README.md).
"""

from __future__ import annotations

import pendulum
from _params import data_settings, reject_unknown_conf, window_end, window_end_param
from _support import (
    IO_TASK_DEFAULTS,
    drift_asset,
    drift_settings,
    log,
    registry_settings,
    tracking_uri,
)
from airflow.sdk import dag, task

DRIFT = drift_asset()


@dag(
    dag_id="monitor_drift",
    schedule="0 1 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    # A monitor runs from the start; it only ever asks train_and_deploy (paused until someone
    # enables it, as `make run` does) for a run.
    is_paused_upon_creation=False,
    default_args=IO_TASK_DEFAULTS,
    params={"data_end_date": window_end_param()},
    tags=["ml", "monitoring", "drift", "mlflow"],
    doc_md=__doc__,
)
def monitor_drift():
    @task
    def load_window(**context) -> dict:
        reject_unknown_conf(context)
        from ml.pipeline import load_window
        from ml.settings import with_overrides

        settings = with_overrides(
            data_settings(context["params"]), window_days=drift_settings().window_days
        )
        return load_window(settings, window_end(context))

    @task
    def score(window: dict, **context) -> dict:
        from ml.pipeline import monitor_drift

        return monitor_drift(
            window,
            data_settings(context["params"]),
            drift_settings(),
            registry_settings(),
            tracking_uri=tracking_uri(),
        )

    @task.branch
    def retrain_or_not(report: dict) -> str:
        return "retrain" if report["retrain"] else "no_drift"

    @task(outlets=[DRIFT])
    def retrain(report: dict, **context) -> str:
        reason = (
            f"drift against @champion v{report['champion_version']} in "
            f"{report['window_start']}..{report['window_end']}: {report['summary']}"
        )
        context["outlet_events"][DRIFT].extra = {
            "reason": reason,
            "drift_run_id": report.get("run_id"),
            "champion_version": report["champion_version"],
            "drifted": report["drifted"],
        }
        log.info("Retraining requested: %s", reason)
        return reason

    @task
    def no_drift(report: dict) -> str:
        message = report.get("skipped") or report.get("summary") or "no drift"
        log.info("Nothing triggered: %s", message)
        return message

    report = score(load_window())
    retrain_or_not(report) >> [retrain(report), no_drift(report)]


monitor_drift()
