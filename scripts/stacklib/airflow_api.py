"""Airflow 3's REST API (/api/v2) as the stack's admin: the client, the rollout pool, and a
train_and_deploy run triggered and followed task by task."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from scripts.stacklib import api
from scripts.stacklib.processes import make_private, say
from serving.deploy.local import wait_for as wait_until  # (tenacity)

DAG_ID = "train_and_deploy"


def airflow_password(passwords: Path) -> str:
    """The admin's password, from the file Airflow standalone generates (made 0600)."""
    wait_until(passwords.exists, 60)
    make_private(passwords)
    return json.loads(passwords.read_text())["admin"]


class Airflow:
    """Airflow 3's REST API (/api/v2), logged in as the stack's admin."""

    def __init__(self, url: str, password: str) -> None:
        login = {"username": "admin", "password": password}
        answer = httpx.post(f"{url}/auth/token", json=login, timeout=30).raise_for_status()
        self.token = answer.json()["access_token"]  # also the UI's `_token` cookie
        auth = {"Authorization": f"Bearer {self.token}"}
        self.http = httpx.Client(base_url=f"{url}/api/v2", headers=auth, timeout=30)

    def __call__(self, method: str, path: str, *, repeatable: bool = False, **kwargs: Any) -> Any:
        return api.json_call(self.http, method, path, repeatable=repeatable, **kwargs)

    def run(self, run_id: str, part: str = "") -> Any:
        return self("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}{part}")


def rollout_pool(api: Airflow) -> None:
    """The one-slot pool every rollout task runs in (one rollout at a time, across DAGs)."""
    from serving.deploy.settings import DeploySettings

    pool = {
        "name": DeploySettings().rollout_pool,
        "slots": 1,
        "description": "one model rollout at a time",
    }
    action = {"action": "create", "entities": [pool], "action_on_existence": "overwrite"}
    answer = api("PATCH", "/pools", json={"actions": [action]}, repeatable=True)  # overwrite
    if errors := answer["create"]["errors"]:
        raise SystemExit(f"Airflow pool {pool['name']}: {errors}")
    say(f"Airflow pool {pool['name']}: 1 slot")


def trigger_and_follow(api: Airflow, conf: dict, airflow_url: str) -> tuple[str, dict[str, str]]:
    """Trigger a train_and_deploy run with ``conf`` (unpaused first, once parsed), print each
    task's state as it changes until the run ends; ``(run_id, {task: last state})``."""
    if not wait_until(lambda: api.http.get(f"/dags/{DAG_ID}").status_code == 200, 240, 2):
        errors = api("GET", "/importErrors")
        raise SystemExit(f"{DAG_ID} was not parsed in 240 s; import errors: {errors}")
    if (dag := api("GET", f"/dags/{DAG_ID}"))["is_paused"]:
        api("PATCH", f"/dags/{DAG_ID}", json={"is_paused": False})
        say(f"unpaused {DAG_ID} (nightly schedule {dag.get('timetable_summary')})")
    body = {"logical_date": None, "conf": conf}
    run_id = api("POST", f"/dags/{DAG_ID}/dagRuns", json=body)["dag_run_id"]
    say(f"triggered {DAG_ID} run {run_id}; follow it at {airflow_url}/dags/{DAG_ID}")
    seen: dict[str, str] = {}

    def ended() -> bool:  # prints each task's state as it changes
        instances = api.run(run_id, "/taskInstances")["task_instances"]
        # In the order things happened; tasks not started yet (skipped ones) come last.
        for ti in sorted(
            instances, key=lambda t: (not t["start_date"], t["start_date"] or "", t["task_id"])
        ):
            if ti["state"] and seen.get(ti["task_id"]) != ti["state"]:
                seen[ti["task_id"]] = ti["state"]
                say(f"  {ti['task_id']:<18} {ti['state']}")
        return api.run(run_id)["state"] in ("success", "failed")

    if not wait_until(ended, 3600, 3):
        raise SystemExit(f"run {run_id} did not finish in an hour")
    return run_id, seen
