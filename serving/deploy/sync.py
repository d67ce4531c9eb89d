"""Is what is live what ``@champion`` names? What reconcile and deploy_model ask before a
rollout, outside the rollout slot (the rollout decides again inside it: ``rollout.plan``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from ml.settings import RegistrySettings
from serving.deploy.rollout import FAILED_TAG, Request, _v
from serving.deploy.target import EndpointUnreachable, Live

log = logging.getLogger("serving.deploy.sync")


def observe_live(deploy: Any, *, tracking_uri: str) -> Live:
    """What is live, seen from an Airflow worker (local: the target; kubernetes: HTTP)."""
    if deploy.target == "local":
        from serving.deploy.local import LocalTarget

        return LocalTarget(deploy, tracking_uri).live()
    from serving.deploy.verify import Endpoint

    try:
        with Endpoint(deploy.endpoint_url, timeout_s=10.0) as endpoint:
            healthy = endpoint.ping()
            return Live(endpoint.served_version(), healthy, deploy.endpoint_url)
    except EndpointUnreachable as exc:
        return Live(None, False, str(exc))


def reconcile_report(
    registry: RegistrySettings, deploy: Any, *, tracking_uri: str
) -> dict[str, Any]:
    """Does the endpoint serve what ``@champion`` names, and does it answer?

    ``converge`` is True when a rollout of ``@champion`` should run: the alias exists, and
    what is live is another version or not healthy, and the version has not already failed
    verification (that one waits for a person: promote it again or deploy it by hand).
    ``uncleared`` says why ``@champion`` may not be live (``ml.gate.uncleared``), or is None:
    a rollout of it is refused and puts the alias back on what is served; one already served
    stays reported here (and by the ModelChampionNotCleared alert) until a person acts.
    """
    from ml.gate import uncleared
    from ml.registry import Registry

    champion = Registry(tracking_uri, registry).champion()
    live = observe_live(deploy, tracking_uri=tracking_uri)
    alias = registry.champion_alias
    report: dict[str, Any] = {
        "alias": alias,
        "alias_version": champion.version if champion else None,
        "live_version": live.version,
        "healthy": live.healthy,
        "detail": live.detail,
        "converge": False,
        "uncleared": uncleared(champion.tags) if champion else None,
    }
    if champion is None:
        report["reason"] = f"no @{alias}: nothing to converge to"
    elif FAILED_TAG in champion.tags:
        report["reason"] = (
            f"@{alias} names v{champion.version}, which failed verification "
            f"({champion.tags[FAILED_TAG][:200]}); not retrying automatically"
        )
    elif live.version == champion.version and live.healthy:
        report["reason"] = "in sync"
        if report["uncleared"]:
            report["reason"] += (
                f", but v{champion.version} may not be live: {report['uncleared']}; tag it "
                "`force` with a reason, or deploy a version that passed its gate"
            )
    else:
        report["converge"] = True
        state = "healthy" if live.healthy else f"not healthy: {live.detail}"
        report["reason"] = f"@{alias} names v{champion.version}; live: {_v(live.version)} ({state})"
    (log.warning if report["uncleared"] else log.info)("Reconcile: %s", report["reason"])
    return report


def request_for_deploy_model(
    *,
    version: int | str | None,
    reason: str,
    retry_failed: bool,
    events: list[Mapping[str, Any]],
    run_id: str | None,
    deploy: Any,
    registry: RegistrySettings,
    tracking_uri: str,
) -> dict[str, Any]:
    """``deploy_model``'s first step: the rollout request (JSON), or None when all is in sync.

    A manual version is always rolled out. Otherwise the request is "whatever @champion names
    when the rollout runs"; only the one cheap case is settled here, outside the rollout slot:
    @champion already live and healthy (the echo of the pipeline's own promotion, or a
    reconcile that raced a rollout). Skipping then is safe: nothing would change.
    """
    from ml.registry import Registry

    for event in events:
        log.info(
            "Triggered by %s: @%s -> v%s (delivery %s)",
            event.get("source", "an asset event"),
            event.get("alias"),
            event.get("version"),
            event.get("delivery_id"),
        )
    if version is not None and str(version).strip():
        request = Request(
            kind="version",
            version=str(version).strip(),
            reason=reason or f"deploy_model run {run_id}: version {version} by hand",
            run_id=run_id,
        )
        return {"request": request.to_json(), "why": "a version was given"}
    promoted = bool(events)
    request = Request(
        kind="champion",
        reason=reason
        or (f"promotion in the registry ({len(events)} event(s))" if promoted else "by hand"),
        run_id=run_id,
        # A person moving the alias (or triggering by hand) asks again; reconcile does not.
        retry_failed=retry_failed,
    )
    champion = Registry(tracking_uri, registry).champion()
    if champion is not None:
        request = Request(**{**request.to_dict(), "champion_at_request": champion.version})
    live = observe_live(deploy, tracking_uri=tracking_uri)
    if champion is not None and live.version == champion.version and live.healthy:
        log.info(
            "@%s v%s is live and healthy: nothing to roll out",
            registry.champion_alias,
            champion.version,
        )
        return {"request": None, "why": "in sync"}
    log.info(
        "@%s names %s; live: %s (%s): rolling out",
        registry.champion_alias,
        _v(champion.version if champion else None),
        _v(live.version),
        "healthy" if live.healthy else live.detail,
    )
    return {"request": request.to_json(), "why": "out of sync"}
