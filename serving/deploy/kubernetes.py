"""The ``kubernetes`` target: the serving Deployment, rolled by the Deployment controller.

:meth:`KubernetesTarget.deploy`: **server-side apply** :func:`serving.deploy.manifests.deployment`
to the bootstrapped Deployment (forced, the ``resourceVersion`` just read as a precondition: a
409 re-reads and applies again; nothing when this version is rolled out already); **watch** it
until complete (``kubectl rollout status``), past ``progressDeadlineSeconds`` or a new pod
crash-looping; then **undo** (``kubectl rollout undo``) and raise: pods that started and never
became ready are a verdict (:class:`NotReady`), pods never scheduled or pulled a fault
(:class:`DeployFailed`). Verification and restoring after a wrong answer are
:mod:`serving.deploy.rollout`'s. :meth:`withdraw` scales to zero (the HPA leaves that alone; the
next deploy scales back). API calls without an answer are retried for ``api_retry_s``, then a
fault; clusters older than :data:`MIN_KUBERNETES` are refused before anything is applied. A
shadow or canary (:mod:`serving.deploy.progressive`) runs the candidate on the canary
Deployment beside it and moves the traffic by its replicas or a Gateway's HTTPRoute
(:meth:`start_candidate`, :meth:`route`, :meth:`promote_candidate`, :meth:`drop_candidate`;
the objects: :mod:`serving.deploy.canary`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from tenacity import (
    Retrying,
    retry_if_exception,
    retry_if_result,
    stop_after_delay,
    wait_exponential,
    wait_fixed,
)

from serving.deploy import canary, manifests
from serving.deploy.kube_api import KubeApi
from serving.deploy.kube_objects import (
    api_error,
    describe_pods,
    model_uri_of,
    revision,
    rollout_state,
    template_key,
    unknown_field,
    version_of,
)
from serving.deploy.settings import DeploySettings
from serving.deploy.target import DeployFailed, Live, NotReady, TargetRejected

log = logging.getLogger(__name__)
T = TypeVar("T")

# The oldest release with every field the Deployment uses (lifecycle.preStop.sleep: 1.30).
MIN_KUBERNETES = (1, 30)
# Waiting reasons of a new pod that no wait cures. Crashing: the version's server starts and
# dies (a verdict); stuck: the image or the pod's config (a fault of the cluster).
CRASHING = {"CrashLoopBackOff", "RunContainerError"}
STUCK = {"ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
         "CreateContainerConfigError", "CreateContainerError"}  # fmt: skip
POD_CHECK_S = 5.0


class _Stuck(Exception):
    def __init__(self, reason: str, *, verdict: bool) -> None:
        super().__init__(reason)
        self.verdict = verdict


class KubernetesTarget:
    """The serving Deployment as a rollout target (:class:`serving.deploy.target.Target`)."""

    name = "kubernetes"

    def __init__(self, api: KubeApi, settings: DeploySettings, *, tracking_uri: str) -> None:
        self.api, self.settings, self.tracking_uri = api, settings, tracking_uri
        self.selector = manifests.label_selector(settings)

    @property
    def endpoint(self) -> str:
        return self.settings.endpoint_url

    @contextmanager
    def lock(self, holder: str) -> Iterator[None]:
        log.info("rollout by %s (one at a time: the %s pool)", holder, self.settings.rollout_pool)
        yield

    def live(self) -> Live:
        dep = self.api.get()
        if dep is None:
            return Live(None, False, "the Deployment does not exist (bootstrap it first)")
        version = version_of(dep["spec"]["template"])
        if dep["spec"].get("replicas", 1) == 0:
            return Live(version, False, "withdrawn: scaled to zero replicas")
        state, why = rollout_state(dep)
        status = dep.get("status") or {}
        # Healthy: every pod runs the pinned template and at least one is available. Not
        # "available == spec.replicas": an autoscaler scale-up is not an outage. The counts
        # say so only once the controller has seen this spec: before, they are the previous
        # template's pods.
        seen = (status.get("observedGeneration") or 0) >= (dep["metadata"].get("generation") or 0)
        only_pinned = seen and status.get("replicas", 0) == status.get("updatedReplicas", 0)
        healthy = state != "stuck" and only_pinned and status.get("availableReplicas", 0) > 0
        return Live(version, healthy, f"{state}: {why}")

    def deploy(self, model_uri: str, version: str) -> dict[str, Any]:
        started = time.monotonic()
        self._check_server()
        dep = self._require()
        body = self._render(model_uri, version)
        withdrawn = dep["spec"].get("replicas", 1) == 0
        same = template_key(dep["spec"]["template"]) == template_key(body["spec"]["template"])
        if same and not withdrawn and rollout_state(dep)[0] == "complete":
            log.info("v%s is already rolled out and available: nothing applied", version)
            return {"status": "unchanged", "revision": revision(dep)}
        applied = self._apply(body)
        log.info("applied v%s (revision %s)", version, revision(applied) or "?")
        if withdrawn:
            self.api.scale(self.settings.min_replicas)
            log.info("scaled back to %d replicas (it was withdrawn)", self.settings.min_replicas)
            # Wait for this generation, not the apply's: the controller's status for the apply
            # (0 replicas wanted, all of them there) would read as a complete rollout.
            applied = self._require()
        try:
            done = self._await(applied)
        except _Stuck as stuck:
            restored = self._undo(applied, str(stuck))
            what = f"v{restored} serves again" if restored else "nothing served before it"
            message = f"v{version} never became available: {stuck}; undone ({what})"
            if stuck.verdict:
                raise NotReady(message, restored=restored) from None
            raise DeployFailed(message) from None
        ready_s = round(time.monotonic() - started, 1)
        return {"status": "rolled_out", "revision": revision(done), "ready_s": ready_s}

    # -- the canary beside it (serving.deploy.canary, serving.deploy.progressive) --------------

    @property
    def mirrors(self) -> bool:
        """Requests can be mirrored (a shadow step) only through a Gateway's HTTPRoute."""
        return bool(self.settings.gateway_name)

    @property
    def candidate_endpoint(self) -> str:
        name, namespace = canary.canary_name(self.settings), self.settings.namespace
        return (self.settings.canary_url or f"http://{name}.{namespace}.svc.cluster.local").rstrip(
            "/"
        )

    def _canary(self) -> KubernetesTarget:
        """The canary Deployment as a target of its own (apply, watch, its pods)."""
        return KubernetesTarget(self.api.sibling(canary.canary_name(self.settings)),
                                self.settings, tracking_uri=self.tracking_uri)  # fmt: skip

    def start_candidate(self, model_uri: str, version: str, *, live_uri: str) -> dict[str, Any]:
        self._check_server()
        self._route(0.0, 0.0)
        stable = self._render(model_uri, version)
        body = canary.canary_deployment(stable, live_uri=live_uri, replicas=1)
        target = self._canary()
        target._require()
        try:
            target._await(target._apply(body))
        except _Stuck as stuck:
            self.drop_candidate()
            message = f"the canary of v{version} never became available: {stuck}"
            if stuck.verdict:  # the live version never stopped serving
                raise NotReady(message, restored=None) from None
            raise DeployFailed(message) from None
        # Available is not yet reachable: its Service's endpoints follow a moment later.
        from serving.deploy.verify import Endpoint

        with Endpoint(self.candidate_endpoint, timeout_s=5.0, fresh_connections=True) as end:
            reachable = Retrying(
                stop=stop_after_delay(self.settings.health_timeout_s),
                wait=wait_fixed(0.5),
                retry=retry_if_result(lambda ok: not ok),
                retry_error_callback=lambda state: False,
            )(end.ping)
        if not reachable:
            self.drop_candidate()
            raise DeployFailed(f"the canary's Service {self.candidate_endpoint} does not answer")
        return {"endpoint": self.candidate_endpoint, "replicas": 1}

    def route(self, weight: float, mirror: float) -> None:
        stable = self._require()
        replicas = canary.canary_replicas(weight, stable["spec"].get("replicas", 1))
        target = self._canary()
        target.api.scale(replicas)
        try:
            target._await(target._require())
        except _Stuck as stuck:
            raise DeployFailed(f"the canary did not scale to {replicas}: {stuck}") from None
        self._route(weight, mirror)
        if not self.mirrors:
            share = replicas / (replicas + max(1, stable["spec"].get("replicas", 1)))
            log.info("%d canary pod(s): ~%.0f%% of the requests by replica ratio", replicas,
                     share * 100)  # fmt: skip

    def _route(self, weight: float, mirror: float) -> None:
        if self.mirrors:
            serving = manifests.service(self.settings)
            route = canary.http_route(serving, self.settings.gateway_name or "", weight, mirror)
            self.api.apply_route(route)

    def candidate_healthy(self) -> bool:
        status = self._canary()._require().get("status") or {}
        return status.get("availableReplicas", 0) > 0

    def promote_candidate(self) -> dict[str, Any]:
        """A rolling update of the serving Deployment to the candidate's model (its own
        buckets), then the canary goes."""
        template = self._canary()._require()["spec"]["template"]
        uri = model_uri_of(template) or ""
        done = self.deploy(uri, version_of(template) or "0")
        self.drop_candidate()
        return done

    def drop_candidate(self) -> None:
        """Every request back on the serving Deployment (the route first, then the canary's
        pods go: a terminating pod leaves the Service's endpoints at once)."""
        canary_api = self.api.sibling(canary.canary_name(self.settings))
        current = canary_api.get()
        self._route(0.0, 0.0)
        if current is not None and current["spec"].get("replicas", 0) > 0:
            canary_api.scale(0)
            log.info("canary %s scaled to zero", canary_api.name)

    def withdraw(self) -> None:
        self.api.scale(0)
        log.warning("%s scaled to zero replicas: the endpoint serves nothing", self.api.name)

    # -- steps -------------------------------------------------------------------------------

    def _render(self, model_uri: str, version: str) -> dict[str, Any]:
        return manifests.deployment(
            self.settings, model_uri, version, tracking_uri=self.tracking_uri
        )

    def _check_server(self) -> None:
        major, minor = self.api.server_version()
        if (major, minor) < MIN_KUBERNETES:
            need = ".".join(map(str, MIN_KUBERNETES)) + " or newer (lifecycle.preStop.sleep)"
            why = f"the serving Deployment needs {need}. Upgrade the cluster."
            raise TargetRejected(f"the cluster runs Kubernetes {major}.{minor}; {why}")

    def _require(self) -> dict[str, Any]:
        dep = self.api.get()
        if dep is None:
            first = "bootstrap the serving objects first (docs/operations.md, 'First install')"
            raise TargetRejected(
                f"Deployment {self.api.namespace}/{self.api.name} does not exist: {first}"
            )
        return dep

    def _apply(self, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply on the state just read; a 409 re-reads and tries again."""
        from kubernetes.client.exceptions import ApiException

        def attempt() -> dict[str, Any]:
            current = self._require()
            guarded = copy.deepcopy(body)
            guarded["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
            return self.api.apply(guarded)

        try:
            return Retrying(
                stop=stop_after_delay(self.api.retry_s),
                wait=wait_exponential(multiplier=0.25, max=4),
                retry=retry_if_exception(lambda e: getattr(e, "status", None) == 409),
                before_sleep=lambda s: log.warning(
                    "apply conflict: %s; re-reading", api_error(s.outcome.exception())
                ),
                reraise=True,
            )(attempt)
        except ApiException as exc:
            if field := unknown_field(exc):
                need = "1.30" if field.endswith("sleep") else "a newer release"
                why = f"field {field} (Kubernetes {need} has it): {api_error(exc)}"
                raise TargetRejected(f"the API server rejects the Deployment's {why}") from exc
            if exc.status in (400, 403, 409, 422):
                raise TargetRejected(f"the apply was refused: {api_error(exc)}") from exc
            raise

    def _await(self, dep: dict[str, Any]) -> dict[str, Any]:
        """Until the rollout of ``dep``'s spec is complete; raises :class:`_Stuck`."""
        deadline = time.monotonic() + self.settings.progress_deadline_s + 30
        version = version_of(dep["spec"]["template"])
        next_pods = 0.0
        while True:
            state, why = rollout_state(dep)
            if state == "complete":
                log.info("v%s rolled out: %s", version, why)
                return dep
            if state == "stuck":
                verdict, pods = self._pods(dep)
                raise _Stuck(f"{why}; pods: {pods}", verdict=verdict)
            if time.monotonic() >= next_pods:
                self._fail_fast(dep)
                next_pods = time.monotonic() + POD_CHECK_S
            if time.monotonic() >= deadline:
                verdict, pods = self._pods(dep)
                raise _Stuck(f"not complete within the progress deadline: {why}; pods: {pods}",
                             verdict=verdict)  # fmt: skip
            dep = self._next(dep, min(POD_CHECK_S, deadline - time.monotonic()))

    def _next(self, dep: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        """The Deployment's next version (or the same one after ``timeout_s``)."""

        def watch() -> dict[str, Any]:
            from kubernetes.client.exceptions import ApiException

            try:
                for changed in self.api.watch(dep["metadata"]["resourceVersion"], timeout_s):
                    return changed
            except ApiException as exc:
                if exc.status != 410:  # 410 Gone: too old a resourceVersion; read afresh
                    raise
            return self.api.get() or dep  # the watch ended: read, in case an event was missed

        return self.api.call("WATCH deployment", watch)

    def _new_pods(self, dep: dict[str, Any]) -> list[dict[str, Any]]:
        """Pods of the ReplicaSet that runs ``dep``'s template."""
        key = template_key(dep["spec"]["template"])
        sets = [
            rs for rs in self.api.replica_sets(self.selector)
            if template_key(rs["spec"]["template"]) == key
        ]  # fmt: skip
        if not sets:
            return []
        rs = max(sets, key=revision)
        pod_hash = rs["metadata"]["labels"].get("pod-template-hash", "")
        return self.api.pods(f"{self.selector},pod-template-hash={pod_hash}")

    def _fail_fast(self, dep: dict[str, Any]) -> None:
        for pod in self._new_pods(dep):
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                reason = ((cs.get("state") or {}).get("waiting") or {}).get("reason")
                if reason in CRASHING or reason in STUCK:
                    name = pod["metadata"]["name"]
                    raise _Stuck(f"pod {name}: {reason}", verdict=reason in CRASHING)

    def _pods(self, dep: dict[str, Any]) -> tuple[bool, str]:
        """(a verdict?, the new pods in words): :func:`kube_objects.describe_pods`."""
        return describe_pods(self._new_pods(dep))

    def _undo(self, dep: dict[str, Any], reason: str) -> str | None:
        """``kubectl rollout undo``: the newest older revision's pod template, applied and
        waited for. Nothing older: withdraw. Returns the version put back."""
        key = template_key(dep["spec"]["template"])
        sets = self.api.replica_sets(self.selector)
        older = [rs for rs in sets if template_key(rs["spec"]["template"]) != key]
        if not older:
            log.error("%s; no previous revision: withdrawing", reason)
            self.withdraw()
            return None
        previous = max(older, key=revision)
        template = copy.deepcopy(previous["spec"]["template"])
        template["metadata"].get("labels", {}).pop("pod-template-hash", None)
        template["metadata"].pop("creationTimestamp", None)
        uri = model_uri_of(template) or ""
        version = version_of(template)
        log.error("%s; undoing to revision %d (%s)", reason, revision(previous), uri)
        body = self._render(uri, version or "0")
        body["spec"]["template"] = template
        try:
            self._await(self._apply(body))
        except _Stuck as stuck:
            raise DeployFailed(f"{reason}; AND the undo to {uri} failed: {stuck}") from None
        return version
