"""The one rollout path, as the tasks every deploying DAG builds: the gating task's rollout
decision (what the approval task asks, the rollout request) and the rollout tasks per deploy
target (``rollout_local`` in the worker, ``rollout_kubernetes`` in a pod).

Kept out of DAG parsing by ``.airflowignore``; imports nothing heavy (``serving.deploy.rollout``
and the registry load when a task runs).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from _params import deploy_settings, gate_settings, param_templates
from _support import log, pod_task, registry_settings, tracking_uri

from ml.settings import RegistrySettings
from serving.deploy.settings import DeploySettings


def rollout_decision(
    version: str, decision: Mapping[str, Any], evaluation: Mapping[str, Any], context: Any
) -> dict[str, Any]:
    """What a gating task returns: the gate's ``decision`` plus ``route`` (``approval`` or
    ``not_deployed``), the rollout ``request`` (JSON) and what the approval task asks
    (``ask``; its form's evidence only when this run requires an approval).

    The request deploys ``version`` only while ``@champion`` still names the version the gate
    compared it with: a promotion in between wins (decided when the rollout runs).
    """
    from serving.deploy.rollout import Request

    if not decision["passed"]:
        return {**decision, "route": "not_deployed", "request": None, "ask": None}
    params, run_id = context["params"], context["run_id"]
    gate = gate_settings(params)
    request = Request(
        "candidate",
        str(version),
        champion_at_eval=evaluation.get("champion_version"),
        reason=f"{context['dag'].dag_id} run {run_id}",
        run_id=run_id,
    )
    ask = {
        "required": gate.require_approval,
        "route": f"rollout_{deploy_settings(params).target}",
        "version": str(version),
        "timeout_s": gate.approval_timeout_s,
    }
    if gate.require_approval:
        from ml.governance import evidence

        ask["subject"] = f"Deploy {registry_settings().model_name} v{version} to production?"
        ask["body"] = evidence(
            str(version), evaluation, decision, gate, registry_settings(),
            tracking_uri=tracking_uri(),
        )  # fmt: skip
    return {**decision, "route": "approval", "request": request.to_json(), "ask": ask}


def rollout_tasks(request: Any) -> tuple[Any, Any]:
    """``rollout_local`` and ``rollout_kubernetes``: the rollout path, per deploy target.

    ``request`` is the XComArg of the rollout request (JSON) the deciding task returned. Both
    run in the one-slot rollout pool (one rollout at a time across all DAGs) and do the whole
    plan, deploy, verify, promote or restore (``serving.deploy.rollout.run``): the local one
    in the worker, the Kubernetes one in a pod. A verdict (a check on the version ran and
    failed) or a refusal fails the task without retries; a fault is retried and marks nothing.
    """
    from airflow.sdk import task

    deploy = DeploySettings()

    @task(task_id="rollout_local", pool=deploy.rollout_pool, queue=deploy.local_queue)
    def rollout_local(request: str, **context) -> dict:
        from airflow.sdk.exceptions import AirflowFailException

        from serving.deploy.assets import LINKS_KEY
        from serving.deploy.rollout import run_request
        from serving.deploy.target import RequestRejected, TargetRejected, Verdict

        uri = tracking_uri()
        try:
            outcome = run_request(
                request, deploy_settings(context["params"]), registry_settings(), tracking_uri=uri
            )
        except Verdict as exc:
            raise AirflowFailException(f"verdict (not retried): {exc}") from exc
        except (RequestRejected, TargetRejected) as exc:  # retrying cannot change it
            raise AirflowFailException(f"refused (not retried): {exc}") from exc
        for line in outcome["steps"]:
            log.info("%s", line)
        return {**outcome, LINKS_KEY: _links(uri, outcome.get("version"))}

    def rollout_pod() -> dict[str, Any]:
        from serving.deploy.pods import rollout_pod_kwargs

        prefix = DeploySettings.model_config["env_prefix"]
        return rollout_pod_kwargs(
            deploy,
            registry=RegistrySettings(),
            request=request,
            tracking_uri="{{ mlflow_tracking_uri() }}",
            # The run's strategy and judge: its Params, rendered into the pod's env.
            env={
                f"{prefix}{field.upper()}": template
                for field, template in param_templates(DeploySettings).items()
                if field != "target"
            },
        )

    rollout_kubernetes = pod_task(
        "rollout_kubernetes", rollout_pod, final_exit_codes=True, pool=deploy.rollout_pool
    )
    rollout_kubernetes.set_upstream(request.operator)
    return rollout_local(request), rollout_kubernetes


def _links(uri: str, version: str | None) -> dict[str, str]:
    from ml.registry import Registry
    from serving.deploy.assets import mlflow_ui_links

    if not version:
        return {}
    try:
        info = Registry(uri, registry_settings()).get(version)
        run = info.run_id
        experiment = Registry(uri, registry_settings()).client.get_run(run).info.experiment_id
    except Exception:  # only links
        return mlflow_ui_links(uri, registry_settings().model_name, version)
    return mlflow_ui_links(
        uri, registry_settings().model_name, version, run_id=run, experiment_id=experiment
    )
