"""
### monitor_quality

Daily check of how wrong the live model actually is, from the labels that came back for what
the model servers answered; retrains on need; suggests better versions.

`check → retrain_or_not → (retrain | no_retrain)`

* **Window**: the newest `PIPELINE_QUALITY_WINDOW_DAYS` days ending (exclusive) at the run's
  data interval end, or at the `data_end_date` Param, of the servers' payload log
  (`PIPELINE_QUALITY_PAYLOAD_PATH`) and of the labels (`PIPELINE_QUALITY_LABELS_PATH`:
  `request_id`, optional `row`, the target column). With the synthetic data source the check
  first writes the source's ground truth for the rows served `label_delay_days` earlier.
* **Live error**: RMSE and MAE of each served version over its labelled rows, and of
  `@champion` per day; an MLflow run in the `<experiment>-quality` experiment
  (`live_rmse.v<N>`, `live_mae.v<N>`, `live_rows.v<N>`, `quality/report.json`), exported to
  Prometheus by the Airflow plugin.
* **Retrain**: when `@champion`'s live RMSE was above the gate's `max_rmse` on each of the
  `PIPELINE_QUALITY_BREACH_DAYS` newest days with enough labelled rows, `retrain` emits an
  event on the `live-error/<model>` asset, which `train_and_deploy` is scheduled on; the reason
  travels in the event and is recorded on the training run and the version it produces.
* **Retro-challenger**: the newest `PIPELINE_QUALITY_RETRO_VERSIONS` registered versions,
  gate-rejected ones included, are scored on the labelled rows next to `@champion`; each is
  tagged `retro.beats_champion` true or false (with `retro.live_rmse`). A suggestion for a
  person (promote it in MLflow: `deploy_model` rolls it out); nothing is promoted here.

Every task is one call into `ml/`; see docs/operations.md, "Live quality".
"""

from __future__ import annotations

import pendulum
from _params import data_settings, gate_settings, reject_unknown_conf, window_end, window_end_param
from _support import (
    IO_TASK_DEFAULTS,
    live_error_asset,
    log,
    quality_settings,
    registry_settings,
    tracking_uri,
)
from airflow.sdk import dag, task

LIVE_ERROR = live_error_asset()


@dag(
    dag_id="monitor_quality",
    schedule="30 1 * * *",
    start_date=pendulum.datetime(2026, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    # A monitor runs from the start, like monitor_drift: it only asks train_and_deploy for runs.
    is_paused_upon_creation=False,
    default_args=IO_TASK_DEFAULTS,
    params={"data_end_date": window_end_param()},
    tags=["ml", "monitoring", "quality", "mlflow"],
    doc_md=__doc__,
)
def monitor_quality():
    @task
    def check(**context) -> dict:
        reject_unknown_conf(context)
        from ml.quality import monitor_quality

        return monitor_quality(
            data_settings(context["params"]),
            quality_settings(),
            gate_settings(context["params"]),
            registry_settings(),
            end=window_end(context),
            tracking_uri=tracking_uri(),
        )

    @task.branch
    def retrain_or_not(report: dict) -> str:
        return "retrain" if report["retrain"] else "no_retrain"

    @task(outlets=[LIVE_ERROR])
    def retrain(report: dict, **context) -> str:
        reason = (
            f"live error in {report['window_start']}..{report['window_end']}: {report['summary']}"
        )
        context["outlet_events"][LIVE_ERROR].extra = {
            "reason": reason,
            "quality_run_id": report["run_id"],
            "champion_version": report["champion_version"],
        }
        log.info("Retraining requested: %s", reason)
        return reason

    @task
    def no_retrain(report: dict) -> str:
        for version in report["suggested"]:
            log.warning("v%s beat @champion on the labelled rows: a promotion to consider", version)
        log.info("Nothing triggered: %s", report["summary"])
        return report["summary"]

    report = check()
    retrain_or_not(report) >> [retrain(report), no_retrain(report)]


monitor_quality()
