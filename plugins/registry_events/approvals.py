"""An approval answered in MLflow: the ``approval`` tag on a version, turned into the answer of
the Airflow approval task that waits for it.

A person sets ``approval.reason`` (and ``approval.by``, their name: MLflow's webhook does not
say who set a tag) on the version, then ``approval`` = ``approved`` or ``rejected``. The
webhook of that last tag arrives here; the version's ``approval.pending`` tag names the waiting
task (``ml.governance.record_pending``), and the answer goes through the Core API's own
handler (``update_hitl_detail``: its locks, its checks, its resume of the parked task), as a
PATCH of the REST API would, from the user ``mlflow-approval-tag`` named after ``approval.by``.
The approval task then records the decision on the version like any other.
"""

from __future__ import annotations

import json
from typing import Any

from registry_events.exporter import tracking_uri


class _Responder:
    """The user an answer from MLflow is given as (what the Core API handler asks of one)."""

    def __init__(self, name: str) -> None:
        from ml.governance import MLFLOW_RESPONDER

        self.id, self.name = MLFLOW_RESPONDER, name

    def get_id(self) -> str:
        return self.id

    def get_name(self) -> str:
        return self.name


def answer(model: str, version: str, key: str, value: Any) -> dict[str, Any]:
    """Answer the approval waiting for ``model`` v``version`` with the tag ``key=value``:
    ``{"status": "answered", ...}``, ``{"status": "ignored", "reason": ...}``, or
    ``{"status": "retry", ...}`` when MLflow cannot be read (a 503: MLflow delivers again)."""
    from airflow.api_fastapi.core_api.datamodels.hitl import UpdateHITLDetailPayload
    from airflow.api_fastapi.core_api.routes.public.hitl import update_hitl_detail
    from airflow.utils.session import create_session
    from fastapi import HTTPException
    from mlflow import MlflowClient

    from ml import governance as g

    if key != g.APPROVAL_TAG:
        return {"status": "ignored", "reason": f"tag {key!r} answers no approval"}
    if value not in g.OPTIONS:
        return {"status": "ignored", "reason": f"approval={value!r}: answer approved or rejected"}
    uri = tracking_uri()
    try:
        tags = MlflowClient(uri, registry_uri=uri).get_model_version(model, version).tags
    except Exception as exc:
        return {"status": "retry", "reason": f"cannot read v{version} of {model!r}: {exc}"}
    if not tags.get(g.PENDING_TAG):
        return {"status": "ignored", "reason": f"no approval is waiting for v{version}"}
    waiting = json.loads(tags[g.PENDING_TAG])
    payload = UpdateHITLDetailPayload(
        chosen_options=[g.OPTIONS[value]],
        params_input={"reason": tags.get(g.REASON_TAG, "")},
    )
    responder = _Responder(tags.get(g.BY_TAG) or "unnamed (MLflow tag)")
    try:
        with create_session() as session:
            update_hitl_detail(
                dag_id=waiting["dag_id"],
                dag_run_id=waiting["run_id"],
                task_id=waiting["task_id"],
                update_hitl_detail_payload=payload,
                user=responder,
                session=session,
                map_index=-1,
            )
    except HTTPException as exc:  # 404: no such task any more; 409: answered already
        return {"status": "ignored", "reason": f"v{version}: {exc.detail}"}
    return {"status": "answered", "decision": value, "by": responder.name, **waiting}
