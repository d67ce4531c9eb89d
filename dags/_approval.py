"""The approval task: a person in the loop between the gate and the rollout.

An Airflow human-in-the-loop task (the standard provider's ``HITLOperator``): it shows the
gate's evidence in Browse → Required Actions and takes the answer there, over the REST API
(``PATCH /api/v2/dags/{dag}/dagRuns/{run}/taskInstances/approval/-1/hitlDetails``), or from
the ``approval`` tag a person sets on the version in MLflow (the `registry_events` plugin turns
the tag's webhook into the same answer). Airflow 3.3 parks a waiting task in
``awaiting_input``: no process, no worker slot, no triggerer, and never a pool slot (it is
not in ``model_rollout`` either). No answer within the timeout is a rejection: the
scheduler's sweep resolves it with the form's default, ``Reject``.

It also routes: approved (or approval not required) → the rollout task of the run's deploy
target; rejected → nothing downstream runs, the run ends successfully with the decision
recorded on the version (``ml.governance``), like a rejection by the gate.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from _rollout import rollout_tasks
from _support import log, registry_settings, tracking_uri
from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param
from airflow.sdk.bases.branch import BranchMixIn

from ml.governance import APPROVED, MLFLOW_RESPONDER, OPTIONS, REJECTED
from ml.settings import GateSettings


def approval_and_rollout(decision: Any) -> Approval:
    """``approval`` on the gating task's ``ask``, then the rollout tasks on its ``request``;
    returns the approval task, for the gating branch to route to."""
    approval = Approval(
        task_id="approval",
        ask=decision["ask"],
        # The form's one field (the run's Params are not shown: only the task's own).
        params={
            "reason": Param(
                "",
                type="string",
                maxLength=1000,
                title="Reason",
                description="Why: recorded on the version (approval.reason).",
            )
        },
        # The deployment's timeout; each run's own is set when the task runs.
        response_timeout=timedelta(seconds=GateSettings().approval_timeout_s),
    )
    approval >> list(rollout_tasks(decision["request"]))
    return approval


class Approval(HITLOperator, BranchMixIn):
    """``ask`` (templated: the deciding task's value) holds ``required``, ``route`` (the
    rollout task), ``version``, ``timeout_s``, ``subject`` and ``body`` (Markdown)."""

    inherits_from_skipmixin = True
    template_fields = ("ask",)

    def __init__(self, *, ask: Any, **kwargs: Any) -> None:
        super().__init__(
            subject="Approve a model version for production",
            options=[OPTIONS[APPROVED], OPTIONS[REJECTED]],
            defaults=[OPTIONS[REJECTED]],  # what a timeout answers
            **kwargs,
        )
        self.ask = ask

    def execute(self, context: Any) -> Any:
        ask = self.ask
        if not ask["required"]:
            log.info("Approval not required (require_approval is off): on to %s", ask["route"])
            return self.do_branch(context, ask["route"])
        self.subject, self.body = ask["subject"], ask["body"]
        self.response_timeout = timedelta(seconds=ask["timeout_s"])
        from ml.governance import record_pending

        ti = context["ti"]
        waiting = {"dag_id": ti.dag_id, "run_id": ti.run_id, "task_id": ti.task_id}
        record_pending(ask["version"], waiting, registry_settings(), tracking_uri=tracking_uri())
        log.info(
            "v%s waits for a person's decision (at most %ss)", ask["version"], ask["timeout_s"]
        )
        return super().execute(context)  # parks the task: awaiting_input

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from ml.governance import record_decision

        ask = self.ask
        if "error" in event or event.get("timedout"):
            approved, by, via = False, "timeout", "timeout"
            reason = f"no decision within {ask['timeout_s']}s: rejected"
        else:
            answer = super().execute_complete(context, event)
            user = answer["responded_by_user"] or {}
            approved = answer["chosen_options"] == [OPTIONS[APPROVED]]
            by = str(user.get("name") or user.get("id") or "?")
            via = "mlflow" if user.get("id") == MLFLOW_RESPONDER else "airflow"
            reason = str((answer["params_input"] or {}).get("reason") or "")
        record_decision(
            ask["version"], approved=approved, by=by, via=via, reason=reason,
            registry=registry_settings(), tracking_uri=tracking_uri(),
        )  # fmt: skip
        return self.do_branch(context, ask["route"] if approved else None)
