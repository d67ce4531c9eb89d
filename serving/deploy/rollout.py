"""The one rollout path: every way a version goes live goes through :func:`run`.

Who asks, and with which :class:`Request`:

=====================================  =====================================================
nightly / UI run of train_and_deploy   ``candidate``: the version the gate approved, valid
                                       only while ``@champion`` still names the version it
                                       was compared against
promotion in the MLflow registry       ``champion``: whatever ``@champion`` names *now*
reconcile, ``make run`` after restart  ``champion`` (does not retry a version that failed)
manual deploy / rollback (deploy_model ``version``: exactly that version, even one that
with a version number)                 failed before; ``@champion`` moves to it once verified
=====================================  =====================================================

What :func:`run` does, holding the target's rollout lock the whole time (and, in Airflow, the
one slot of the ``model_rollout`` pool), so that two rollouts never interleave and the
decision is always taken on the state it acts on:

1. read ``@champion`` and what the target serves (version, healthy or not);
2. :func:`plan` (pure): skip, refuse, check what is live, or deploy. A version goes live only
   with a passed gate or a person's ``force`` reason (``ml.gate.uncleared``); any other is
   refused: tagged ``rollout.refused``, and ``@champion``, if a person moved it there, is put
   back on what the target serves (:class:`RequestRejected`, final);
3. deploy (the target keeps the old version serving until the new one is ready), then
   verify the endpoint on the version's fixed rows (:mod:`serving.deploy.verify`); with the
   strategy ``shadow`` or ``canary`` the version is started and verified beside the live one
   and earns its traffic in judged steps first (:mod:`serving.deploy.progressive`);
4. verified: move ``@champion`` to it when the request says so (only if nobody moved the
   alias meanwhile), drop ``@challenger``;
5. verification ran and failed: that is a verdict. Tag the version ``rollout.failed`` with the
   reason, put back what was live before (or withdraw the endpoint if nothing was), move
   ``@champion`` back if it names the failed version, raise :class:`VerificationFailed`.

Each outcome on a version (live, stopped serving, failed verification, refused) is an event of
its rollout history, and its model card (the description, ``ml.card``) is written again.

Anything else that goes wrong (the target cannot start a server, the registry or the
endpoint does not answer, the task dies) is not a verdict: nothing is tagged, no alias moves,
the old version keeps serving, and the caller retries. A version that already answers right
ends the run in seconds as ``unchanged``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ml.gate import FORCE_TAG, PASSED_TAG, uncleared
from ml.settings import RegistrySettings
from serving.deploy.target import (
    DeployFailed,
    EndpointUnreachable,
    Live,
    NotReady,
    RequestRejected,
    RolloutError,
    Target,
    TargetRejected,
    Verdict,
    VerificationFailed,
)
from serving.deploy.verify import Rows

log = logging.getLogger("serving.deploy.rollout")

# Version tags written by a rollout. The reason of a failed verification, and which run found
# it (a retry of that run does not deploy it again; a new explicit deploy does).
FAILED_TAG = "rollout.failed"
FAILED_BY_TAG = "rollout.failed_by"
VERIFIED_TAG = "rollout.verified"
# Why a version was refused (never gated, or its gate rejected it, and no `force` reason), and
# the `force` reason a version without a passed gate went live with.
REFUSED_TAG = "rollout.refused"
FORCED_TAG = "rollout.forced"

Kind = Literal["candidate", "champion", "version"]
Strategy = Literal["direct", "shadow", "canary"]
__all__ = [
    "DeployFailed",
    "EndpointUnreachable",
    "Live",
    "NotReady",
    "RequestRejected",
    "RolloutError",
    "Target",
    "TargetRejected",
    "Verdict",
    "VerificationFailed",
]


@dataclass(frozen=True)
class Request:
    kind: Kind
    version: str | None = None
    # candidate: the @champion its gate compared against (None: there was none).
    champion_at_eval: str | None = None
    # Who asked, in words: logged, and written into tags.
    reason: str = ""
    # The Airflow run (or other caller) that asked: a retry of it does not redo a verdict.
    run_id: str | None = None
    # champion requests: deploy @champion even if it failed verification before (a person
    # promoted it again). Reconcile and restarts leave it False.
    retry_failed: bool = False
    # champion requests: what @champion named when the request was made. If this run's own
    # verification already failed it (a retried rollout pod), the retry fails again instead
    # of finding the restored version live and reporting success.
    champion_at_request: str | None = None
    # direct | shadow | canary (serving.deploy.progressive); None: the deploy settings'
    # rollout_strategy.
    strategy: Strategy | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("candidate", "champion", "version"):
            raise ValueError(f"unknown rollout request kind {self.kind!r}")
        if self.strategy not in (None, "direct", "shadow", "canary"):
            raise ValueError(f"unknown rollout strategy {self.strategy!r}")
        if self.kind != "champion" and not str(self.version or "").isdigit():
            raise ValueError(f"a {self.kind} request needs a version number, got {self.version!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | str) -> Request:
        if isinstance(data, str):
            data = json.loads(data)
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown rollout request field(s) {sorted(unknown)}")
        values = dict(data)
        for key in ("version", "champion_at_eval", "champion_at_request"):
            if values.get(key) is not None:
                values[key] = str(values[key])
        return cls(**values)


@dataclass(frozen=True)
class Plan:
    action: Literal["skip", "fail", "refuse", "check", "deploy"]
    version: str | None
    reason: str
    promote: bool = False
    # The `force` reason, when the version goes live without a passed gate.
    forced: str | None = None
    strategy: Strategy = "direct"


def plan(
    request: Request,
    *,
    champion: str | None,
    live: Live,
    tags: Mapping[str, str] | None = None,
    judged_here: tuple[str, str] | None = None,
    strategy: Strategy = "direct",
) -> Plan:
    """What to do, from the request and the state read while holding the rollout lock.

    ``tags`` are the target version's tags (its gate, ``force`` and ``rollout.failed`` tags
    count); ``judged_here`` a (version, reason) this very run already failed verification of;
    ``strategy`` the run's. The rule of production comes first: a version without a passed
    gate or a ``force`` reason is refused whatever the strategy. A shadow or canary applies
    only to a deploy that is allowed, and needs a healthy other version live to be compared
    with (else the deploy is direct). Pure: every rule of the rollout path's decision is here
    and tested as a table.
    """
    tags = tags or {}
    if judged_here is not None:
        return Plan(
            "fail",
            judged_here[0],
            f"this run already failed verification of v{judged_here[0]}: {judged_here[1][:300]}",
        )
    if request.kind == "candidate":
        if champion != request.champion_at_eval:
            return Plan(
                "skip",
                request.version,
                f"superseded: @champion moved from {_v(request.champion_at_eval)} to "
                f"{_v(champion)} after v{request.version} was evaluated against it; "
                "not deploying a decision taken on another champion",
            )
        target, promote = request.version, True
    elif request.kind == "version":
        target, promote = request.version, True
    else:
        if champion is None:
            return Plan("skip", None, "no @champion: nothing to deploy")
        target, promote = champion, False
    why = uncleared(tags)
    if why is not None:
        return Plan(
            "refuse",
            target,
            f"v{target} may not go live: {why}; it needs a passed gate, or a `{FORCE_TAG}` tag "
            "with a person's reason",
        )
    forced = None if tags.get(PASSED_TAG) == "true" else str(tags[FORCE_TAG])[:500]
    if FAILED_TAG in tags:
        same_run = request.run_id is not None and tags.get(FAILED_BY_TAG) == request.run_id
        explicit = request.kind == "version" or (
            request.kind == "champion" and request.retry_failed
        )
        if same_run or not explicit:
            return Plan(
                "fail",
                target,
                f"v{target} failed verification before ({tags[FAILED_TAG][:300]}); not "
                "deploying it again automatically (deploy it by hand with its version number, "
                "or promote it again)",
            )
    why_live = f" (no passed gate; forced: {forced})" if forced else ""
    if live.version == target and live.healthy:
        return Plan(
            "check", target, f"v{target}{why_live} is live and healthy: verifying it", promote,
            forced,
        )  # fmt: skip
    now = (
        f"v{live.version} ({'healthy' if live.healthy else 'unhealthy'})"
        if live.version
        else ("nothing")
    )
    reason = f"deploying v{target}{why_live}; live now: {now}"
    if strategy != "direct" and not live.healthy:
        reason += f"; {strategy} needs a healthy version live to compare with: direct"
        strategy = "direct"
    return Plan("deploy", target, reason, promote, forced, strategy)


@dataclass
class Outcome:
    status: Literal["rolled_out", "unchanged", "skipped"]
    version: str | None
    reason: str
    target: str
    seconds: float = 0.0
    verification: dict[str, Any] | None = None
    champion: str | None = None
    previous: str | None = None
    steps: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(
    request: Request,
    target: Target,
    registry: RegistrySettings,
    *,
    tracking_uri: str,
    lock_holder: str | None = None,
    settings: Any = None,
) -> Outcome:
    """Roll out what ``request`` asks for on ``target``; see the module docstring.

    ``settings`` (``DeploySettings``): the strategy, its steps and the judge's thresholds
    (None: direct). Raises a :class:`Verdict` (tagged, restored) or :class:`RolloutError`
    (anything else: nothing tagged; retry).
    """
    from ml.registry import Registry

    started = time.monotonic()
    steps: list[str] = []

    def step(message: str) -> None:
        steps.append(f"{time.monotonic() - started:6.1f}s {message}")
        log.info("%s", message)

    reg = Registry(tracking_uri, registry)
    holder = lock_holder or request.reason or request.kind
    with target.lock(holder):
        step(f"rollout slot held on the {target.name} target ({holder})")
        # A candidate left by a rollout that was killed outright (no chance to take it out):
        # every request back on the live version before anything is decided.
        target.drop_candidate()
        try:
            champion_info = reg.champion()
        except Exception as exc:  # the registry is down: not a verdict
            raise RolloutError(f"cannot read @{registry.champion_alias}: {exc}") from exc
        champion = champion_info.version if champion_info else None
        live = target.live()
        target_info = None
        wanted = request.version if request.kind != "champion" else champion
        if wanted is not None and wanted == champion:
            target_info = champion_info
        elif wanted is not None:
            try:
                target_info = reg.get(wanted)
            except LookupError as exc:
                raise RequestRejected(f"cannot roll out v{wanted}: {exc}") from exc
        tags = target_info.tags if target_info else {}
        decision = plan(
            request,
            champion=champion,
            live=live,
            tags=tags,
            judged_here=_judged_here(reg, request),
            strategy=request.strategy or (settings.rollout_strategy if settings else "direct"),
        )
        step(
            f"plan: {decision.action} ({decision.reason}); @champion {_v(champion)}, live "
            f"{_v(live.version)}{'' if live.healthy else ' (not healthy)'}"
            + (f"; strategy {decision.strategy}" if decision.action == "deploy" else "")
        )
        outcome = Outcome(
            status="skipped",
            version=decision.version,
            reason=decision.reason,
            target=target.name,
            champion=champion,
            previous=live.version,
            steps=steps,
        )
        if decision.action == "skip":
            if request.kind == "candidate":
                _drop_challenger(reg, registry, request.version)
            outcome.seconds = round(time.monotonic() - started, 1)
            return outcome
        if decision.action == "fail":
            raise VerificationFailed(decision.reason)
        if decision.action == "refuse":
            _refuse(reg, registry, str(decision.version), decision.reason, live, step)
            raise RequestRejected(decision.reason)
        assert target_info is not None and decision.version is not None
        version, model_uri = decision.version, target_info.model_uri
        rows = _rows(target_info, tracking_uri)
        step(f"verification rows: {len(rows.data)} ({rows.source})")

        if decision.action == "check":
            try:
                outcome.verification = _verify(target, version, rows)
                outcome.status = "unchanged"
                step(f"v{version} answers its verification rows: unchanged")
            except VerificationFailed as exc:
                step(f"live v{version} answers wrongly ({exc}): deploying it afresh")
                decision = Plan("deploy", version, "redeploy", decision.promote, decision.forced)
        if decision.action == "deploy" and decision.strategy != "direct":
            from serving.deploy.progressive import roll_out

            live_uri = f"models:/{reg.name}/{live.version}"
            try:
                result = roll_out(target, settings, decision.strategy, version=version,
                                  model_uri=model_uri, live_uri=live_uri, rows=rows, reg=reg,
                                  step=step)  # fmt: skip
            except Verdict as exc:  # the traffic is back on the live version already
                _verdict(reg, registry, target, request, version, str(exc), None, step,
                         restored=live.version)  # fmt: skip
                raise
            outcome.verification, outcome.status = result["verification"], "rolled_out"
        elif decision.action == "deploy":
            # What to go back to if the new version fails verification: what served before.
            restore_to = live.version if live.healthy and live.version != version else None
            if restore_to is None and champion not in (None, version):
                restore_to = champion
            try:
                detail = target.deploy(model_uri, version)
            except NotReady as exc:  # a verdict; the target already put back what it could
                _verdict(reg, registry, target, request, version, str(exc), None, step,
                         restored=exc.restored)  # fmt: skip
                raise
            except (RolloutError, TargetRejected):
                raise
            except Exception as exc:
                raise DeployFailed(f"deploying v{version} failed: {exc}") from exc
            step(f"v{version} deployed ({_brief(detail)})")
            try:
                outcome.verification = _verify(target, version, rows)
            except VerificationFailed as exc:
                _verdict(reg, registry, target, request, version, str(exc), restore_to, step)
                raise
            step(
                f"v{version} verified: {outcome.verification['rows']} rows, max |diff| "
                f"{outcome.verification['max_abs_diff']:.2g}"
            )
            outcome.status = "rolled_out"
        if outcome.status == "rolled_out":
            how = f"on {target.name}: {request.reason or request.kind}"
            if decision.strategy != "direct":
                how += f" ({decision.strategy})"
            _card(
                reg,
                version,
                "live",
                how + (f" (forced: {decision.forced})" if decision.forced else ""),
            )
            if live.version and live.version != version:
                _card(reg, live.version, "stopped serving", f"replaced by v{version}")

        stamp = {VERIFIED_TAG: _stamp(request, target)}
        reg.tag_version(version, stamp | ({FORCED_TAG: decision.forced} if decision.forced else {}))
        _clear_tags(reg, version, {FAILED_TAG, FAILED_BY_TAG, REFUSED_TAG} & set(tags))
        if decision.promote:
            outcome.champion = _promote(reg, registry, version, expected=champion, step=step)
        _drop_challenger(reg, registry, version)
        outcome.seconds = round(time.monotonic() - started, 1)
        step(f"done: {outcome.status} v{version} in {outcome.seconds:.1f}s")
        return outcome


# -- steps -------------------------------------------------------------------------------------


def _rows(version_info: Any, tracking_uri: str) -> Rows:
    from serving.deploy.verify import load_rows

    try:
        return load_rows(version_info.to_dict(), tracking_uri=tracking_uri)
    except Exception as exc:  # the registry or artifact store did not answer: not a verdict
        raise RolloutError(
            f"cannot read the verification rows of v{version_info.version}: {exc}"
        ) from exc


def _verify(target: Target, version: str, rows: Rows) -> dict[str, Any]:
    from serving.deploy.verify import verify

    try:
        return verify(target.endpoint, version, rows)
    except EndpointUnreachable as exc:
        raise RolloutError(f"cannot verify v{version}: {exc}") from exc


def _verdict(
    reg: Any,
    registry: RegistrySettings,
    target: Target,
    request: Request,
    version: str,
    reason: str,
    restore_to: str | None,
    step: Any,
    *,
    restored: str | None = None,
) -> None:
    """A check on the version ran and it failed: tag it, put back what served before (unless
    the target already did: ``restored``), move the alias back."""
    step(f"v{version} FAILED: {reason}")
    reg.tag_version(
        version,
        {FAILED_TAG: reason[:4000], FAILED_BY_TAG: request.run_id or request.reason or "?"},
    )
    _card(reg, version, "failed verification", reason)
    if restored is not None:
        restore_to = restored
        step(f"v{restored} serves again (put back by the {target.name} target)")
    elif restore_to is not None:
        try:
            target.deploy(f"models:/{reg.name}/{restore_to}", restore_to)
            step(f"v{restore_to} restored")
        except Exception as exc:
            # A bad version must not stay live: withdraw; reconcile brings @champion back.
            step(f"restoring v{restore_to} failed ({exc}); withdrawing v{version}")
            target.withdraw()
            restore_to = None
    else:
        target.withdraw()
        step(f"nothing served before v{version}: endpoint withdrawn")
    _drop_challenger(reg, registry, version)
    current = reg.champion()
    if current is not None and current.version == version:
        if restore_to is not None:
            reg.set_alias(registry.champion_alias, restore_to)
            step(f"@{registry.champion_alias} moved back: v{version} -> v{restore_to}")
        else:
            reg.delete_alias(registry.champion_alias)
            step(f"@{registry.champion_alias} removed: nothing served before v{version}")


def _promote(
    reg: Any, registry: RegistrySettings, version: str, *, expected: str | None, step: Any
) -> str | None:
    """Move @champion to ``version`` unless someone moved it while this rollout ran."""
    alias = registry.champion_alias
    current = reg.champion()
    now = current.version if current else None
    if now == version:
        step(f"@{alias} already names v{version}")
        return now
    if now != expected:
        # A promotion happened during this rollout: its own run (queued behind this one)
        # deploys what the alias names; overwriting it would undo a person's decision.
        step(f"@{alias} moved to {_v(now)} during this rollout: left as it is")
        return now
    reg.set_alias(alias, version)
    step(f"@{alias}: {_v(now)} -> v{version}")
    return version


def _drop_challenger(reg: Any, registry: RegistrySettings, version: str | None) -> None:
    try:
        challenger = reg.get(f"@{registry.challenger_alias}")
    except LookupError:
        return
    if version is not None and challenger.version == str(version):
        reg.delete_alias(registry.challenger_alias)


def _refuse(
    reg: Any, registry: RegistrySettings, version: str, reason: str, live: Live, step: Any
) -> None:
    """A version that may not go live: say why on it, and when a person moved ``@champion``
    to it, put the alias back on what the target serves (nothing served: remove it)."""
    step(f"v{version} REFUSED: {reason}")
    reg.tag_version(version, {REFUSED_TAG: reason[:4000]})
    _card(reg, version, "refused", reason)
    current, alias = reg.champion(), registry.champion_alias
    if current is None or current.version != version:
        return
    if live.version is None:
        reg.delete_alias(alias)
        step(f"@{alias} removed: nothing was served before v{version}")
    elif live.version != version:
        reg.set_alias(alias, live.version)
        step(f"@{alias} put back: v{version} -> v{live.version} (what is served)")
    else:
        step(f"@{alias} left on v{version}: the target serves it already (reconcile reports it)")


def _card(reg: Any, version: str, what: str, how: str) -> None:
    """An event in the version's rollout history, and its model card (``ml.card``) again."""
    try:
        reg.update_card(version, (what, how))
    except Exception as exc:  # only bookkeeping: the rollout's own outcome stands
        log.warning("model card of v%s not updated: %s", version, exc)


def _clear_tags(reg: Any, version: str, keys: set[str]) -> None:
    for key in sorted(keys):
        try:
            reg.client.delete_model_version_tag(reg.name, version, key)
        except Exception as exc:  # only bookkeeping
            log.warning("could not delete tag %s of v%s: %s", key, version, exc)


def _judged_here(reg: Any, request: Request) -> tuple[str, str] | None:
    """(version, reason) if this request's run already failed verification of it."""
    if not request.run_id:
        return None
    for version in {request.version, request.champion_at_request} - {None}:
        try:
            tags = reg.get(version).tags
        except LookupError:
            continue
        if tags.get(FAILED_BY_TAG) == request.run_id and FAILED_TAG in tags:
            return str(version), tags[FAILED_TAG]
    return None


def _stamp(request: Request, target: Target) -> str:
    when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return f"{when} on {target.name} ({request.reason or request.kind})"


def _brief(detail: Mapping[str, Any] | None) -> str:
    if not detail:
        return "-"
    keys = ("endpoint", "port", "ready_s", "status", "message")
    return ", ".join(f"{k}={detail[k]}" for k in keys if detail.get(k) is not None)


def _v(version: str | None) -> str:
    return f"v{version}" if version else "none"


def make_target(settings: Any, *, tracking_uri: str) -> Target:
    """The target ``settings.target`` names (in a pod: in-cluster credentials)."""
    if settings.target == "local":
        from serving.deploy.local import LocalTarget

        return LocalTarget(settings, tracking_uri)
    from serving.deploy.kube_api import KubeApi
    from serving.deploy.kubernetes import KubernetesTarget

    return KubernetesTarget(KubeApi.from_environment(settings), tracking_uri=tracking_uri,
                            settings=settings)  # fmt: skip


def run_request(
    request: Mapping[str, Any] | str | Request,
    deploy: Any,
    registry: RegistrySettings,
    *,
    tracking_uri: str,
) -> dict[str, Any]:
    """:func:`run` for a JSON-able request on the target of ``deploy`` (tasks, pods, CLI)."""
    if not isinstance(request, Request):
        request = Request.from_dict(request)
    target = make_target(deploy, tracking_uri=tracking_uri)
    return run(request, target, registry, tracking_uri=tracking_uri, settings=deploy).to_dict()
