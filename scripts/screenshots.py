"""The documentation's screenshots, taken in a real browser from a running stack:
docs/approval-form.png (the approval form of a train_and_deploy run that requires approval)
and docs/model-card.png (the approved version's model card in the MLflow UI).

    scripts/install_browser.sh            # chromium (apt) + playwright-core (npm), once
    .venv/bin/python scripts/stack.py up  # the stack (its ports: MLFLOW_PORT, AIRFLOW_PORT, ...)
    .venv/bin/python scripts/screenshots.py

What it does on the stack: a first train_and_deploy run without approval when there is no
@champion yet, a monitor_drift run (the form shows drift scores), then a run with
`require_approval` (and `force_retrain`) whose form it photographs; it approves that version
over the REST API, waits for its rollout and photographs its model card.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scripts.stack import AIRFLOW_URL, MLFLOW_URL, Airflow, say  # noqa: E402

BROWSER_DIR = Path(
    os.environ.get("PIPELINE_BROWSER_DIR", Path.home() / ".cache/train-and-deploy/browser")
)


def _until(check, what: str, timeout_s: float = 1800) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(3)
    raise SystemExit(f"{what}: not within {timeout_s:.0f}s")


def _run(api: Airflow, dag_id: str, conf: dict, *, until: str = "ended") -> str:
    api("PATCH", f"/dags/{dag_id}", json={"is_paused": False})
    run_id = api("POST", f"/dags/{dag_id}/dagRuns", json={"logical_date": None, "conf": conf})[
        "dag_run_id"
    ]
    say(f"{dag_id} run {run_id} ({json.dumps(conf)})")
    if until == "ended":
        state = _until(
            lambda: (
                (s := api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")["state"])
                in ("success", "failed")
                and s
            ),
            f"{dag_id} run {run_id}",
        )
        if state != "success":
            raise SystemExit(f"{dag_id} run {run_id} {state}: see the Airflow UI")
    return run_id


def _approval(api: Airflow, run_id: str) -> dict:
    path = f"/dags/train_and_deploy/dagRuns/{run_id}/taskInstances/approval"
    return api("GET", path)


def main() -> int:
    from mlflow import MlflowClient

    from ml.settings import RegistrySettings

    playwright = BROWSER_DIR / "node_modules" / "playwright-core"
    if not playwright.exists():
        raise SystemExit(f"no playwright-core in {BROWSER_DIR}: run scripts/install_browser.sh")
    api, model = Airflow(), RegistrySettings().model_name
    client = MlflowClient(MLFLOW_URL, MLFLOW_URL)
    try:
        client.get_model_version_by_alias(model, "champion")
    except Exception:
        _run(api, "train_and_deploy", {})
    _run(api, "monitor_drift", {})
    # A longer window than the champion's: another model, judged on the same holdout rows.
    conf = {"require_approval": True, "force_retrain": True, "data_window_days": 14}
    run_id = _run(api, "train_and_deploy", conf, until="asked")
    state = _until(
        lambda: (s := _approval(api, run_id)["state"]) in ("awaiting_input", "skipped") and s,
        "the approval",
    )
    if state == "skipped":
        raise SystemExit(
            f"run {run_id} asked nobody: its gate rejected the version (is @champion a model "
            "this training can beat? promote a trained version first)"
        )
    pending = [
        v
        for v in client.search_model_versions(f"name = '{model}'")
        if (v.tags or {}).get("approval.pending")
    ]
    version = max(pending, key=lambda v: int(v.version)).version
    host = AIRFLOW_URL.split("://", 1)[1].split(":")[0]
    docs = ROOT / "docs"
    shots = [
        {
            "url": f"{AIRFLOW_URL}/dags/train_and_deploy/runs/{run_id}/tasks/approval/"
            "required_actions",
            "file": str(docs / "approval-form.png"),
            "wait_for": f"v{version}",
            "cookies": [{"name": "_token", "value": api.token, "domain": host, "path": "/"}],
            "height": 2300,  # the whole form: evidence, plots, reason, the two buttons
        }
    ]
    _browser(playwright, shots)
    path = f"/dags/train_and_deploy/dagRuns/{run_id}/taskInstances/approval/-1/hitlDetails"
    reason = "the deltas and the plots are as expected"
    api("PATCH", path, json={"chosen_options": ["Approve"], "params_input": {"reason": reason}})
    _until(
        lambda: (
            api("GET", f"/dags/train_and_deploy/dagRuns/{run_id}")["state"] in ("success", "failed")
        ),
        f"train_and_deploy run {run_id}",
    )
    shots = [
        {
            "url": f"{MLFLOW_URL}/#/models/{model}/versions/{version}",
            "file": str(docs / "model-card.png"),
            "wait_for": "Rollout history",
            "height": 1900,
        }
    ]
    _browser(playwright, shots)
    return 0


def _browser(playwright: Path, shots: list[dict]) -> None:
    with tempfile.NamedTemporaryFile("w", suffix=".json") as jobs:
        json.dump({"playwright": str(playwright), "shots": shots}, jobs)
        jobs.flush()
        subprocess.run(["node", str(ROOT / "scripts" / "screenshots.cjs"), jobs.name], check=True)


if __name__ == "__main__":
    sys.exit(main())
