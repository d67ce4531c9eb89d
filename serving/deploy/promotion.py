"""Registry promotions and rollbacks: what ``deploy_model`` and the reconcile check decide.

The deployment alias (``@champion`` by default) names what is live. A person moves it in the
MLflow UI (or ``deploy_model`` is triggered with a version number, the rollback path); this
module decides which version to roll out and what to do with the alias afterwards. The rollout
and the verification themselves are the shared code in :mod:`serving.deploy`.

Rules, so that the alias and what is live agree again after every run:

* **Resolve once, pin.** A run resolves the alias when it starts and rolls out that version
  number; if the alias moves during the run, the move triggers another run (``max_active_runs=1``
  queues it), which resolves the alias again: the last promotion ends live.
* **Compare before writing the alias.** After verification the alias is moved only if nobody
  moved it since the run started (and only if it is not already there: every alias write is a
  webhook, so writing an unchanged alias would trigger a pointless run).
* **A failed rollout** restores the version that was live when the run started (on a first
  rollout: nothing, so the failed version is withdrawn), moves the alias back to it (again only
  if nobody moved it meanwhile; removes it if nothing was live) and tags the failed version with
  the reason (``rollout.failed``).

No Airflow imports: the DAGs call these functions with plain settings and dicts.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import httpx

from ml.settings import RegistrySettings
from serving.deploy.settings import DeploySettings
from serving.deploy.steps import ROLLOUT_FAILED_TAG, restore_version, withdraw

log = logging.getLogger(__name__)

ASSET_URI_SCHEME = "mlflow"


# -- the asset a promotion is recorded on ---------------------------------------------------------


def alias_asset(model_name: str, alias: str) -> dict[str, str]:
    """``name``/``uri`` of the Airflow asset that stands for "``@alias`` of ``model_name`` moved".

    The webhook plugin records events on it and ``deploy_model`` is scheduled on it; both build
    it here so they cannot disagree.
    """
    alias = alias.removeprefix("@")
    return {
        "name": f"mlflow-alias/{model_name}@{alias}",
        "uri": f"{ASSET_URI_SCHEME}://models/{quote(model_name, safe='')}/aliases/"
        f"{quote(alias, safe='')}",
    }


# -- MLflow UI links ------------------------------------------------------------------------------


def mlflow_ui_links(
    tracking_uri: str,
    name: str,
    version: str,
    *,
    run_id: str | None = None,
    experiment_id: str | None = None,
) -> dict[str, str]:
    """Browser links to a model version (and its training run) in the MLflow UI."""
    if not tracking_uri.lower().startswith(("http://", "https://")):
        return {}  # a database URI has no UI
    base = tracking_uri.rstrip("/")
    links = {"model_version": f"{base}/#/models/{quote(name, safe='')}/versions/{version}"}
    if run_id and experiment_id:
        links["run"] = f"{base}/#/experiments/{experiment_id}/runs/{run_id}"
    return links


# -- what is live ---------------------------------------------------------------------------------


def live_version(deploy: DeploySettings, *, tracking_uri: str) -> str | None:
    """The version the endpoint serves now, or None (nothing deployed, or unknown).

    Local target: the front proxy's ``active.json``. Kubernetes: what the model server reports
    (``GET /v1/model`` / the ``X-Model-Version`` header, ``serving.rollout.served_version``).
    """
    if deploy.target == "local":
        from serving.deploy.local import LocalTarget

        return LocalTarget(deploy, tracking_uri).active_version()
    from serving.deploy.kubernetes import served_version

    try:
        return served_version(deploy.endpoint_url)
    except httpx.HTTPError as exc:
        log.warning("Cannot ask %s which version is live: %s", deploy.endpoint_url, exc)
        return None


# -- deploy_model's steps -------------------------------------------------------------------------


def resolve(
    registry: RegistrySettings,
    deploy: DeploySettings,
    *,
    tracking_uri: str,
    version: str | int | None = None,
    alias: str | None = None,
    events: list[Mapping[str, Any]] | None = None,
) -> dict[str, Any]:
    """Pin the version to roll out and record the state the run starts from.

    ``version`` (a number: the manual/rollback path) wins; otherwise the *current* target of
    ``alias`` (default: the deployment alias) - not the version an event carried, which may
    already be superseded by a later promotion. Returns the version dict (``model_uri`` pinned)
    plus ``requested``, ``champion_at_start``, ``live_at_start``, ``previous`` (the version
    dict to restore if the rollout fails, or None) and ``links`` (MLflow UI).
    """
    from ml.registry import Registry

    reg = Registry(tracking_uri, registry)
    for event in events or ():
        log.info(
            "Triggered by %s: @%s -> v%s (delivery %s)",
            event.get("source", "an asset event"),
            event.get("alias"),
            event.get("version"),
            event.get("delivery_id"),
        )
    if version is not None and str(version).strip():
        requested = str(version).strip()
        if not requested.isdigit():
            raise ValueError(f"version must be a number, got {version!r}")
    else:
        requested = "@" + (alias or registry.champion_alias).removeprefix("@")
    # One read of the deployment alias: it is both the target (alias mode) and the value
    # promote/roll_back compare against, so a move in between cannot be mistaken for ours.
    champion = reg.champion()
    if requested == f"@{registry.champion_alias}":
        if champion is None:
            raise LookupError(f"Registered model {reg.name!r} has no alias {requested}")
        target = champion
    else:
        target = reg.get(requested)
    live = live_version(deploy, tracking_uri=tracking_uri)
    previous = None
    if live is not None:
        try:
            previous = reg.get(live).to_dict()
        except LookupError:
            log.warning("The live version %s is not a version of %s", live, reg.name)
    info = target.to_dict()
    run_id = info.get("run_id")
    experiment_id = None
    if run_id:
        try:
            experiment_id = reg.client.get_run(run_id).info.experiment_id
        except Exception as exc:  # only for a link
            log.warning("Run %s of v%s not readable: %s", run_id, target.version, exc)
    resolution = {
        **info,
        "requested": requested,
        "champion_at_start": champion.version if champion else None,
        "live_at_start": live,
        # Local: no active version means nothing is deployed. Kubernetes: it may mean unknown.
        "live_known": live is not None or deploy.target == "local",
        "previous": previous,
        "links": mlflow_ui_links(
            tracking_uri, target.name, target.version, run_id=run_id, experiment_id=experiment_id
        ),
    }
    log.info(
        "Rolling out %s (%s -> v%s); live now: %s; @%s now: %s",
        target.model_uri,
        requested,
        target.version,
        live or "nothing",
        registry.champion_alias,
        resolution["champion_at_start"] or "none",
    )
    return resolution


def promote(
    resolution: Mapping[str, Any], registry: RegistrySettings, *, tracking_uri: str
) -> dict[str, Any]:
    """Move the deployment alias to the verified version, unless someone moved it meanwhile."""
    from ml.registry import Registry

    reg = Registry(tracking_uri, registry)
    alias, version = registry.champion_alias, str(resolution["version"])
    _clear_failure_tag(reg, version)
    current = reg.champion()
    now = current.version if current else None
    if now == version:
        log.info("@%s already names v%s: nothing to move", alias, version)
        return {"version": version, "moved": False, "alias_now": now}
    if now != resolution.get("champion_at_start"):
        log.warning(
            "@%s moved to v%s while this run rolled out v%s: leaving it; the run that move "
            "triggered deploys v%s",
            alias,
            now,
            version,
            now,
        )
        return {"version": version, "moved": False, "alias_now": now, "superseded": True}
    reg.set_alias(alias, version)
    log.info("@%s: %s -> %s", alias, now or "none", version)
    return {"version": version, "moved": True, "alias_now": version, "previous": now}


def roll_back(
    resolution: Mapping[str, Any] | None,
    reason: str,
    deploy: DeploySettings,
    registry: RegistrySettings,
    *,
    tracking_uri: str,
) -> dict[str, Any]:
    """After a failed rollout: restore what was live, move the alias back, tag the failure."""
    from ml.registry import Registry

    if not resolution:
        return {"rolled_back": False, "reason": "nothing was resolved, nothing rolled out"}
    reg = Registry(tracking_uri, registry)
    failed, alias = str(resolution["version"]), registry.champion_alias
    previous = resolution.get("previous")
    back_to = str(previous["version"]) if previous else None
    reg.tag_version(failed, {ROLLOUT_FAILED_TAG: reason[:4000]})
    log.error("Rollout of v%s failed: %s", failed, reason)

    if back_to == failed:
        log.error("v%s was already live before this run: there is nothing to roll back to", failed)
    elif previous:
        restore_version(previous, deploy, tracking_uri=tracking_uri)
        log.info("v%s restored", back_to)
    elif resolution.get("live_at_start") is None and resolution.get("live_known"):
        # A first rollout: "what was live" is nothing, so the failed version must not serve.
        if live_version(deploy, tracking_uri=tracking_uri) == failed:
            withdraw(deploy, tracking_uri=tracking_uri)
            log.error("Nothing was live before v%s: withdrawn, nothing serves now", failed)
        else:
            log.error("Nothing was live before v%s, and it never went live", failed)

    current = reg.champion()
    now = current.version if current else None
    moved = False
    if now != failed:
        log.info("@%s names %s, not the failed v%s: leaving it", alias, now or "nothing", failed)
    elif back_to and back_to != failed:
        reg.set_alias(alias, back_to)
        log.info("@%s moved back: v%s -> v%s", alias, failed, back_to)
        now, moved = back_to, True
    elif back_to is None and resolution.get("live_at_start") is None and resolution["live_known"]:
        # Nothing was live before: the alias must not name a version that failed to roll out.
        reg.delete_alias(alias)
        log.info("@%s removed: nothing was live before v%s", alias, failed)
        now, moved = None, True
    return {
        "failed_version": failed,
        "restored_version": back_to,
        "alias_moved": moved,
        "alias_now": now,
        "reason": reason,
    }


# -- reconcile -------------------------------------------------------------------------------


def drift(
    registry: RegistrySettings, deploy: DeploySettings, *, tracking_uri: str
) -> dict[str, Any]:
    """Compare the deployment alias with what the endpoint serves.

    ``converge`` is True when a ``deploy_model`` run should roll the alias's version out: they
    differ, the alias exists, and that version has not already failed to roll out (a version
    tagged ``rollout.failed`` is not retried every few minutes; a new promotion or a manual
    ``deploy_model`` run retries it).
    """
    from ml.registry import Registry

    champion = Registry(tracking_uri, registry).champion()
    live = live_version(deploy, tracking_uri=tracking_uri)
    alias_version = champion.version if champion else None
    report: dict[str, Any] = {
        "alias": registry.champion_alias,
        "alias_version": alias_version,
        "live_version": live,
        "converge": False,
    }
    if alias_version is None:
        report["reason"] = f"no @{registry.champion_alias}: nothing to converge to"
    elif alias_version == live:
        report["reason"] = "in sync"
    elif champion is not None and ROLLOUT_FAILED_TAG in champion.tags:
        report["reason"] = (
            f"@{registry.champion_alias} names v{alias_version}, whose rollout failed "
            f"({champion.tags[ROLLOUT_FAILED_TAG][:200]}); not retrying automatically"
        )
    else:
        report["converge"] = True
        report["reason"] = (
            f"@{registry.champion_alias} names v{alias_version} but {live or 'nothing'} is live"
        )
    log.info("Reconcile: %s", report["reason"])
    return report


def _clear_failure_tag(reg: Any, version: str) -> None:
    """A version that now rolled out and verified is no longer a failed rollout."""
    info = reg.get(version)
    if ROLLOUT_FAILED_TAG in info.tags:
        reg.client.delete_model_version_tag(reg.name, version, ROLLOUT_FAILED_TAG)
