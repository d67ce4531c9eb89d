"""What `stack.py run` prints once its run ended: each task's timing, the run's decision,
where the UIs are, and what the model endpoint serves, with a curl against it."""

from __future__ import annotations

import contextlib
import json
from datetime import datetime
from pathlib import Path

import httpx

from scripts.stacklib import prometheus as prom
from scripts.stacklib.airflow_api import Airflow
from scripts.stacklib.processes import say

ENDINGS = ("unchanged", "not_deployed", "rollout_local")  # the tasks a successful run ends with


def task_timings(dag_run: dict, instances: list[dict]) -> list[tuple[str, str, float, float]]:
    """``(task, state, start, seconds)`` of the tasks that ran, in start order; ``start`` is
    seconds after the run was queued (the trigger). Airflow stamps a skipped task too."""

    def at(stamp: str) -> float:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()

    t0, rows = at(dag_run.get("queued_at") or dag_run["start_date"]), []
    for t in sorted((t for t in instances if t["start_date"]), key=lambda t: t["start_date"]):
        if t["end_date"] and t["state"] != "skipped":
            start, end = at(t["start_date"]), at(t["end_date"])
            rows.append((t["task_id"], t["state"], start - t0, end - start))
    return rows


def print_timings(api: Airflow, run_id: str) -> None:
    try:
        rows = task_timings(api.run(run_id), api.run(run_id, "/taskInstances")["task_instances"])
    except (httpx.HTTPError, KeyError, ValueError) as exc:  # a summary only
        return say(f"task timings unavailable ({exc.__class__.__name__}: {exc})")
    say("task timings (start: seconds after the trigger):")
    for task_id, state, start, took in rows:
        say(f"  {task_id:<18} {state:<8} start {start:6.1f} s  took {took:6.1f} s")
    if rows:
        say(f"  trigger to the last task's end: {max(s + t for _, _, s, t in rows):.1f} s")


def report(
    api: Airflow,
    state: str,
    tasks: dict[str, str],
    run_id: str,
    *,
    airflow_url: str,
    mlflow_url: str,
    password: str,
    prometheus_url: str | None,
    task_logs: Path,
) -> int:
    """The run's ending and where things are (Prometheus: ``prometheus_url`` when it runs);
    0 when the run succeeded, else 1."""
    decision = ""  # in the words of the task that ended the run
    for task in (t for t in ENDINGS if tasks.get(t) == "success"):
        with contextlib.suppress(httpx.HTTPError, KeyError, TypeError):
            value = api.run(run_id, f"/taskInstances/{task}/xcomEntries/return_value")["value"]
            if isinstance(value, dict):
                value = f"rollout of version {value.get('version')}: {value['status']}"
            decision = f" ({value})"
    print()
    say(f"run {run_id}: {state}{decision}")
    print(f"  Airflow UI : {airflow_url}  (login admin / {password})")
    print(f"  MLflow UI  : {mlflow_url}")
    if prometheus_url:
        print(prometheus_line(prom.prometheus_pages(prometheus_url), prometheus_url))
    if state != "success":
        failed = [t for t, s in tasks.items() if s in ("failed", "upstream_failed")]
        print(f"  failed tasks: {', '.join(failed)}; logs in the Airflow UI or {task_logs}")
    try:
        print_served(mlflow_url)
    except Exception as exc:  # the summary's last part: say why rather than a traceback
        print(f"  Model      : could not ask the endpoint ({exc.__class__.__name__}: {exc})")
    return 0 if state == "success" else 1


def prometheus_line(pages: dict[str, str], url: str) -> str:
    """The summary's Prometheus line, with the pages this Prometheus serves."""
    named = {"targets": "scrape targets", "alerts": "alert rules"}
    links = ", ".join(f"{what}: {pages[page]}" for page, what in named.items() if page in pages)
    return f"  Prometheus : {pages.get('graph', url)}" + (f"  ({links})" if links else "")


def print_served(mlflow_url: str) -> None:
    """What the front port serves, whatever the run decided, and a curl against it with its
    real answer."""
    import mlflow
    from mlflow.models import Model

    from ml.settings import RegistrySettings
    from serving.deploy.local import LocalTarget
    from serving.deploy.settings import DeploySettings

    registry, target = RegistrySettings(), LocalTarget(DeploySettings(), mlflow_url)
    if not (live := target.live()).healthy:
        return print(f"  Model      : nothing answers at {target.endpoint} ({live.detail})")
    mlflow.set_tracking_uri(mlflow_url)
    uri, champion = f"models:/{registry.model_name}/{live.version}", None
    with contextlib.suppress(mlflow.MlflowException):
        client = mlflow.MlflowClient()
        champion = client.get_model_version_by_alias(
            registry.model_name, registry.champion_alias
        ).version
    alias = f"@{registry.champion_alias}" + ("" if champion == live.version else f" is v{champion}")
    print(f"  Model      : {target.endpoint}/invocations  (serves {uri}, {alias})")
    if (example := Model.load(uri).load_input_example()) is None:
        return print("  (this version has no input example to try it with)")
    body = json.dumps({"dataframe_split": example.head(1).to_dict(orient="split", index=False)})
    headers = {"Content-Type": "application/json"}
    answer = httpx.post(f"{target.endpoint}/invocations", content=body, headers=headers, timeout=30)
    print("  Try it:")
    print(f"    curl -s {target.endpoint}/invocations -H 'Content-Type: application/json' \\")
    print(f"      -d '{body}'")
    print(f"    -> {answer.status_code} {answer.text.strip()}")
