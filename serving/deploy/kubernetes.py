"""Roll a pinned model version out to the serving Deployment, check it, roll back on failure.

``python -m serving.deploy rollout --model-uri models:/regression-model/7 --version 7`` runs inside
the KubernetesPodOperator pod (in-cluster config; ``KUBECONFIG`` elsewhere) and does, logging
each step:

1. **read** the Deployment (it must exist: an administrator bootstraps it with
   ``python -m serving.deploy render``). If it already runs this version (same pinned URI and image)
   and its rollout is complete, only the smoke test runs: a re-run is a no-op, no PATCH.
2. **apply** the Deployment of ``serving.manifests`` by server-side apply (field manager
   ``train-and-deploy``, ``force=True``: the pipeline is the owner of what it declares, a
   hand edit of the model URI is taken back and logged). The apply carries the
   ``resourceVersion`` it read, as a precondition: if anyone changed the Deployment between the
   read and the apply, the API answers 409 and the rollout re-reads (so the revision it would
   roll back to is the one really replaced) and retries with backoff.
3. **wait** until the rolling update is complete (``observedGeneration >= generation``,
   ``updatedReplicas == availableReplicas == replicas`` and no old replicas left) within the
   deadline; fail fast on ``Progressing=False/ProgressDeadlineExceeded`` and on new pods that
   cannot start (image pull errors, crash loops, bad config).
4. **smoke test** through the Service (in-cluster DNS name, or ``--service-url``): the model's
   serving input example must get predictions, and the answering pods must report the
   expected model version (``X-Model-Version`` header, else ``GET /v1/model``), several times
   in a row on fresh connections, so old pods still draining cannot pass for new ones.
5. On any failure: **roll back** by applying the previous revision's pod template (the one
   read in step 1; when resuming an interrupted rollout, the previous ReplicaSet's): the
   semantics of ``kubectl rollout undo`` without the removed rollback API. Wait for it, check
   the previous version answers, exit non-zero with the reason.

Exit codes: 0 rolled out or already live; 1 failed and rolled back (the previous version
serves); 2 bad arguments; 3 failed and NOT rolled back (no previous revision, the rollback
failed too, the Deployment is missing or paused): a person has to look.

The cluster I/O is behind :class:`KubeClient` (four calls) and HTTP behind :class:`Smoke`, so
the decision logic in :class:`Rollout` runs against a test double (tests/serving/k8s_fake.py).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
    wait_incrementing,
)

from serving.deploy import manifests
from serving.deploy.manifests import FIELD_MANAGER, MODEL_URI_ENV, parse_pinned_uri
from serving.deploy.settings import DeploySettings
from serving.server.contract import VERSION_HEADER

log = logging.getLogger("serving.rollout")

EXIT_OK = 0
EXIT_ROLLED_BACK = 1
EXIT_USAGE = 2
EXIT_FAILED = 3

REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
# Waiting reasons of a new pod's container that will not go away by waiting longer.
FATAL_WAITING_REASONS = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "CrashLoopBackOff",
    }
)
# API answers worth retrying for reads (the apply has its own 409 handling).
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})


class RolloutFailed(RuntimeError):
    """A step failed; the message says why (it ends up in the task log and the exit message)."""


class NothingChanged(RolloutFailed):
    """Failed before anything was applied (missing/paused Deployment, apply rejected)."""


# -- cluster I/O ---------------------------------------------------------------------------------


class KubeClient:
    """The four Kubernetes calls a rollout makes, on the real ``kubernetes`` client.

    Objects are plain camelCase dicts as the API server sends them (``_preload_content=False``):
    a rollback re-applies a template exactly as it was read.
    """

    def __init__(
        self,
        api_client: Any,
        namespace: str,
        deployment: str,
        *,
        read_retries: int = 3,
        retry_delay_s: float = 1.0,
    ) -> None:
        from kubernetes import client

        self.namespace = namespace
        self.deployment = deployment
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.read_retries = read_retries
        self.retry_delay_s = retry_delay_s

    @classmethod
    def from_environment(cls, namespace: str, deployment: str) -> KubeClient:
        """In-cluster config inside a pod (service account token), else ``KUBECONFIG``."""
        import os

        from kubernetes import client, config

        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
            where = "in-cluster service account"
        else:
            # Read KUBECONFIG now (the client reads it once, at import time).
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
            where = f"kubeconfig {os.environ.get('KUBECONFIG', '~/.kube/config')}"
        api_client = client.ApiClient()
        log.info("Kubernetes API %s (%s)", api_client.configuration.host, where)
        return cls(api_client, namespace, deployment)

    def _read(self, what: str, call: Callable[[], Any]) -> Any:
        """``call()``'s JSON, retrying transient API answers and dropped connections."""
        from kubernetes.client.exceptions import ApiException
        from urllib3.exceptions import HTTPError

        def transient(exc: BaseException) -> bool:
            if isinstance(exc, ApiException):
                return exc.status in TRANSIENT_STATUSES
            return isinstance(exc, HTTPError)

        def warn(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            problem = f"{exc.status} {exc.reason}" if isinstance(exc, ApiException) else repr(exc)
            log.warning(
                "%s: %s; retrying (%d/%d)", what, problem, state.attempt_number, self.read_retries
            )

        retrying = Retrying(
            stop=stop_after_attempt(self.read_retries),
            wait=wait_incrementing(start=self.retry_delay_s, increment=self.retry_delay_s),
            retry=retry_if_exception(transient),
            before_sleep=warn,
            reraise=True,
        )
        return retrying(lambda: json.loads(call().data))

    def get_deployment(self) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._read(
                f"GET deployment {self.namespace}/{self.deployment}",
                lambda: self.apps.read_namespaced_deployment(
                    self.deployment, self.namespace, _preload_content=False
                ),
            )
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def apply_deployment(self, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply; raises ``ApiException`` (409 on a conflict) for the caller."""
        response = self.apps.patch_namespaced_deployment(
            self.deployment,
            self.namespace,
            body,
            field_manager=FIELD_MANAGER,
            force=True,
            _content_type="application/apply-patch+yaml",
            _preload_content=False,
        )
        return json.loads(response.data)

    def list_replica_sets(self, label_selector: str) -> list[dict[str, Any]]:
        data = self._read(
            "LIST replicasets",
            lambda: self.apps.list_namespaced_replica_set(
                self.namespace, label_selector=label_selector, _preload_content=False
            ),
        )
        return data.get("items") or []

    def list_pods(self, label_selector: str) -> list[dict[str, Any]]:
        data = self._read(
            "LIST pods",
            lambda: self.core.list_namespaced_pod(
                self.namespace, label_selector=label_selector, _preload_content=False
            ),
        )
        return data.get("items") or []


# -- HTTP to the model server ------------------------------------------------------------------


class Smoke:
    """Predictions and the served version, through the Service, on fresh connections."""

    def __init__(
        self,
        *,
        passes: int = 3,
        interval_s: float = 1.0,
        request_timeout_s: float = 10.0,
    ) -> None:
        self.passes = passes
        self.interval_s = interval_s
        self.request_timeout_s = request_timeout_s

    def check(
        self, base_url: str, payload: str | None, expected_version: str, timeout_s: float
    ) -> str:
        """Return a summary once ``passes`` consecutive checks succeed; raise on the deadline.

        A failing check resets the count: right after a rollout, pods of the old ReplicaSet may
        still be terminating behind the Service; a version mismatch that lasts the whole
        timeout is a real one.
        """
        base = base_url.rstrip("/")
        deadline = time.monotonic() + timeout_s
        good = 0
        attempts = 0
        problem = "no attempt made"
        while True:
            attempts += 1
            try:
                summary = self.once(base, payload, expected_version)
            except RolloutFailed as exc:
                good = 0
                problem = str(exc)
                log.info("smoke check %d: %s", attempts, problem)
            else:
                good += 1
                if good >= self.passes:
                    return f"{summary} ({good} checks in a row)"
            if time.monotonic() >= deadline:
                raise RolloutFailed(
                    f"smoke test through {base} failed for {timeout_s:g}s "
                    f"({attempts} attempts); last: {problem}"
                )
            time.sleep(self.interval_s)

    def once(self, base: str, payload: str | None, expected_version: str) -> str:
        from serving.deploy.verify import Endpoint, EndpointUnreachable

        # A new connection per request, so possibly another pod behind the Service.
        try:
            with Endpoint(
                base, timeout_s=self.request_timeout_s, fresh_connections=True
            ) as endpoint:
                if payload is None:
                    version = endpoint.served_version()
                    rows = 0
                else:
                    resp = endpoint.invoke(payload)
                    if resp.status_code != 200:
                        raise RolloutFailed(
                            f"POST {base}/invocations answered {resp.status_code}: "
                            f"{resp.text[:300]!r}"
                        )
                    rows = _prediction_count(resp)
                    version = resp.headers.get(VERSION_HEADER) or endpoint.served_version()
        except EndpointUnreachable as exc:
            raise RolloutFailed(f"{base} is not reachable: {exc}") from exc
        if version is None:
            raise RolloutFailed(f"{base} does not report which model version it serves")
        if str(version) != str(expected_version):
            raise RolloutFailed(
                f"{base} serves model version {version}, expected {expected_version}"
            )
        what = f"{rows} prediction(s)" if payload is not None else "no input example: version only"
        return f"{base} serves version {version}: {what}"


def served_version(base_url: str) -> str | None:
    """The model version a live endpoint reports (``GET /v1/model``), or None if it does not."""
    from serving.deploy.verify import served_version as _served

    return _served(base_url)


def _prediction_count(resp: httpx.Response) -> int:
    try:
        body = resp.json()
    except ValueError as exc:
        raise RolloutFailed(f"/invocations answered non-JSON: {resp.text[:300]!r}") from exc
    predictions = body.get("predictions") if isinstance(body, dict) else body
    if not isinstance(predictions, list | dict) or not predictions:
        raise RolloutFailed(f"/invocations answered no predictions: {resp.text[:300]!r}")
    return len(predictions)


# -- reading a Deployment ------------------------------------------------------------------------


def container(template: dict[str, Any]) -> dict[str, Any] | None:
    containers = (template.get("spec") or {}).get("containers") or []
    for c in containers:
        if c.get("name") == manifests.CONTAINER_NAME:
            return c
    return containers[0] if containers else None


def template_model_uri(template: dict[str, Any]) -> str | None:
    """The pinned model URI a pod template runs (its ``MODEL_URI`` env var)."""
    c = container(template) or {}
    for env in c.get("env") or []:
        if env.get("name") == MODEL_URI_ENV:
            return env.get("value")
    annotations = (template.get("metadata") or {}).get("annotations") or {}
    return annotations.get(manifests.MODEL_URI_ANNOTATION)


def template_image(template: dict[str, Any]) -> str | None:
    return (container(template) or {}).get("image")


def _version_of(uri: str | None) -> str | None:
    try:
        return parse_pinned_uri(uri or "")[1]
    except ValueError:
        return None


@dataclass(frozen=True)
class RolloutState:
    """``kubectl rollout status`` for one Deployment object."""

    observed: bool
    replicas: int
    updated: int
    available: int
    total: int
    deadline_exceeded: str | None

    @classmethod
    def of(cls, dep: dict[str, Any]) -> RolloutState:
        spec, status = dep.get("spec") or {}, dep.get("status") or {}
        generation = (dep.get("metadata") or {}).get("generation") or 0
        deadline = None
        for cond in status.get("conditions") or []:
            if cond.get("type") == "Progressing" and cond.get("reason") == (
                "ProgressDeadlineExceeded"
            ):
                deadline = cond.get("message") or "ProgressDeadlineExceeded"
        replicas = spec.get("replicas")
        return cls(
            observed=(status.get("observedGeneration") or 0) >= generation,
            replicas=1 if replicas is None else int(replicas),
            updated=int(status.get("updatedReplicas") or 0),
            available=int(status.get("availableReplicas") or 0),
            total=int(status.get("replicas") or 0),
            deadline_exceeded=deadline,
        )

    @property
    def complete(self) -> bool:
        return (
            self.observed
            and self.deadline_exceeded is None
            and self.updated == self.replicas
            and self.total == self.replicas
            and self.available == self.replicas
        )

    def summary(self) -> str:
        if not self.observed:
            return "the controller has not seen the new spec yet"
        return (
            f"{self.updated}/{self.replicas} updated, {self.available}/{self.replicas} "
            f"available, {self.total - self.updated} old replica(s) left"
        )


# -- the rollout ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Previous:
    """What to roll back to: a pod template that ran before, and its model URI."""

    template: dict[str, Any]
    model_uri: str | None
    source: str

    @property
    def version(self) -> str | None:
        return _version_of(self.model_uri)


@dataclass
class RolloutResult:
    status: str  # rolled_out | unchanged | rolled_back | failed
    exit_code: int
    model_uri: str
    version: str
    namespace: str
    deployment: str
    message: str
    previous_model_uri: str | None = None
    previous_version: str | None = None
    smoke: str | None = None
    seconds: float = 0.0
    steps: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k != "steps"} | {"steps": self.steps}


class Rollout:
    """One rollout of ``model_uri`` (pinned) to the Deployment, with rollback on failure."""

    def __init__(
        self,
        kube: KubeClient,
        settings: DeploySettings,
        *,
        model_uri: str,
        version: str,
        tracking_uri: str,
        service_url: str | None = None,
        input_example: Callable[[str], str | None] = lambda uri: None,
        smoke: Smoke | None = None,
        timeout_s: float | None = None,
        smoke_timeout_s: float | None = None,
        poll_s: float = 2.0,
        conflict_retries: int = 5,
        backoff_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.version = parse_pinned_uri(model_uri, version)[1]
        self.model_uri = model_uri
        self.kube = kube
        self.settings = settings
        self.tracking_uri = tracking_uri
        self.service_url = (
            service_url
            or settings.service_url
            or (
                f"http://{settings.deployment_name}.{settings.namespace}.svc.cluster.local"
                f":{manifests.SERVICE_PORT}"
            )
        )
        self.input_example = input_example
        self.smoke = smoke or Smoke()
        self.timeout_s = float(timeout_s if timeout_s is not None else settings.health_timeout_s)
        self.smoke_timeout_s = float(
            smoke_timeout_s if smoke_timeout_s is not None else settings.smoke_timeout_s
        )
        self.poll_s = poll_s
        self.conflict_retries = conflict_retries
        self.backoff_s = backoff_s
        self.clock = clock
        self.sleep = sleep
        self.desired = manifests.deployment(
            settings, model_uri, self.version, tracking_uri=tracking_uri
        )
        self.selector = ",".join(f"{k}={v}" for k, v in manifests.selector_labels(settings).items())
        self._steps: list[str] = []
        self._started = clock()

    # -- public ------------------------------------------------------------------------------

    def run(self) -> RolloutResult:
        name = f"{self.settings.namespace}/{self.settings.deployment_name}"
        log.info("rollout of %s (version %s) to deployment %s", self.model_uri, self.version, name)
        previous: Previous | None = None
        try:
            with self._step("read"):
                live = self.kube.get_deployment()
                if live is None:
                    raise NothingChanged(
                        f"deployment {name} does not exist: bootstrap the namespace once with "
                        "`python -m serving.deploy render ... | kubectl apply --server-side -f -` "
                        "(the rollout's RBAC may change the Deployment, not create it)"
                    )
                if (live.get("spec") or {}).get("paused"):
                    raise NothingChanged(
                        f"deployment {name} is paused (`kubectl rollout resume` it first): "
                        "a rollout would never progress"
                    )
                template = (live.get("spec") or {}).get("template") or {}
                live_uri = template_model_uri(template)
                log.info(
                    "live: %s, image %s, revision %s, %s",
                    live_uri,
                    template_image(template),
                    (live["metadata"].get("annotations") or {}).get(REVISION_ANNOTATION),
                    RolloutState.of(live).summary(),
                )

            if not self._needs_apply(live):
                state = RolloutState.of(live)
                previous = self._previous_from_history(live)
                if state.complete:
                    log.info("version %s is already live: checking that it answers", self.version)
                    smoke = self._smoke(self.version, self.model_uri)
                    return self._result(
                        "unchanged", EXIT_OK, "already live; nothing applied", smoke
                    )
                log.info(
                    "version %s is already applied but its rollout is not complete (%s): "
                    "an earlier rollout was interrupted; waiting for it",
                    self.version,
                    state.summary(),
                )
            else:
                with self._step("apply"):
                    previous = self._apply_new(live)
            with self._step("wait"):
                self._wait(self.model_uri)
            smoke = self._smoke(self.version, self.model_uri)
        except NothingChanged as exc:
            return self._result("failed", EXIT_FAILED, f"{exc}; nothing was changed")
        except RolloutFailed as exc:
            return self._roll_back(previous, str(exc))
        except Exception as exc:  # an API error we do not expect: still never leave it broken
            log.exception("unexpected error")
            return self._roll_back(previous, f"unexpected error: {_api_error(exc)}")
        return self._result(
            "rolled_out",
            EXIT_OK,
            f"version {self.version} is live",
            smoke,
            previous=previous,
        )

    # -- steps -------------------------------------------------------------------------------

    @contextmanager
    def _step(self, name: str) -> Iterator[None]:
        started = self.clock()
        log.info("step %s: started", name)
        try:
            yield
        except Exception as exc:
            self._steps.append(f"{name}: failed after {self.clock() - started:.1f}s")
            log.error("step %s: failed: %s", name, exc)
            raise
        self._steps.append(f"{name}: ok in {self.clock() - started:.1f}s")
        log.info("step %s: ok (%.1fs)", name, self.clock() - started)

    def _needs_apply(self, live: dict[str, Any]) -> bool:
        template = (live.get("spec") or {}).get("template") or {}
        desired_template = self.desired["spec"]["template"]
        return template_model_uri(template) != self.model_uri or template_image(
            template
        ) != template_image(desired_template)

    def _apply_new(self, live: dict[str, Any]) -> Previous:
        """Apply the new Deployment; on 409 re-read, so ``previous`` is what got replaced."""
        from kubernetes.client.exceptions import ApiException

        current = {"live": live}

        def attempt() -> Previous:
            live = current["live"]
            previous = Previous(
                template=live["spec"]["template"],
                model_uri=template_model_uri(live["spec"]["template"]),
                source=f"the Deployment before this rollout (resourceVersion "
                f"{live['metadata'].get('resourceVersion')})",
            )
            self._log_other_managers(live)
            body = copy.deepcopy(self.desired)
            # Optimistic lock: apply only onto the object we read previous from.
            body["metadata"]["resourceVersion"] = live["metadata"].get("resourceVersion")
            try:
                applied = self.kube.apply_deployment(body)
            except ApiException as exc:
                if exc.status == 409:
                    # Someone changed it since we read it: re-read, so that the revision to roll
                    # back to is really the one this apply replaces.
                    reread = self.kube.get_deployment()
                    if reread is None:
                        raise NothingChanged(
                            "the Deployment was deleted during the rollout"
                        ) from exc
                    current["live"] = reread
                raise
            log.info(
                "applied %s (generation %s, field manager %s); replaces %s",
                self.model_uri,
                applied.get("metadata", {}).get("generation"),
                FIELD_MANAGER,
                previous.model_uri,
            )
            return previous

        try:
            return self._on_conflict("apply")(attempt)
        except ApiException as exc:
            raise NothingChanged(f"apply failed: {_api_error(exc)}") from exc

    def _log_other_managers(self, live: dict[str, Any]) -> None:
        others = sorted(
            {
                f"{m.get('manager')} ({m.get('operation')})"
                for m in live["metadata"].get("managedFields") or []
                if m.get("manager") != FIELD_MANAGER
                and not m.get("subresource")
                and "f:spec" in (m.get("fieldsV1") or {})
            }
        )
        if others:
            log.info(
                "other managers of the Deployment's spec: %s; force=True takes over the fields "
                "this rollout declares (the pipeline owns the model it serves)",
                ", ".join(others),
            )

    def _wait(self, target_uri: str, timeout_s: float | None = None) -> None:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = self.clock() + timeout_s
        last = ""
        while True:
            dep = self.kube.get_deployment()
            if dep is None:
                raise RolloutFailed("the Deployment disappeared while waiting for the rollout")
            state = RolloutState.of(dep)
            if state.observed and state.deadline_exceeded:
                raise RolloutFailed(
                    f"Kubernetes reports ProgressDeadlineExceeded ({state.deadline_exceeded}); "
                    f"{state.summary()}; pods: {self._pod_summary(dep, target_uri)}"
                )
            if state.complete:
                log.info("rollout complete: %s", state.summary())
                return
            problem = self._pod_problem(dep, target_uri)
            if problem:
                raise RolloutFailed(f"new pods cannot start: {problem}")
            if state.summary() != last:
                last = state.summary()
                log.info("waiting: %s", last)
            if self.clock() >= deadline:
                raise RolloutFailed(
                    f"rollout not complete within {timeout_s:g}s: {state.summary()}; "
                    f"pods: {self._pod_summary(dep, target_uri)}"
                )
            self.sleep(self.poll_s)

    def _smoke(self, version: str | None, model_uri: str | None) -> str:
        with self._step("smoke"):
            payload = None
            if model_uri:
                try:
                    payload = self.input_example(model_uri)
                except Exception as exc:
                    log.warning(
                        "no input example for %s (%s): checking the version only", model_uri, exc
                    )
            if payload is None:
                log.warning("smoke test without an input example: version check only")
            summary = self.smoke.check(
                self.service_url, payload, version or "?", self.smoke_timeout_s
            )
            log.info("smoke test ok: %s", summary)
            return summary

    # -- pods ---------------------------------------------------------------------------------

    def _new_pods(self, dep: dict[str, Any], target_uri: str) -> list[dict[str, Any]]:
        """Pods of the ReplicaSet that runs ``target_uri`` (the newest such revision)."""
        image = template_image(dep["spec"]["template"])
        candidates = [
            rs
            for rs in self.kube.list_replica_sets(self.selector)
            if template_model_uri(rs["spec"]["template"]) == target_uri
            and template_image(rs["spec"]["template"]) == image
        ]
        if not candidates:
            return []
        rs = max(candidates, key=_revision)
        pod_hash = (rs["metadata"].get("labels") or {}).get("pod-template-hash")
        if not pod_hash:
            return []
        return self.kube.list_pods(f"{self.selector},pod-template-hash={pod_hash}")

    def _pod_problem(self, dep: dict[str, Any], target_uri: str) -> str | None:
        problems = []
        for pod in self._new_pods(dep, target_uri):
            name = pod["metadata"]["name"]
            status = pod.get("status") or {}
            if status.get("phase") == "Failed":
                problems.append(f"pod {name} failed: {status.get('reason') or ''}".strip())
            for cs in status.get("containerStatuses") or []:
                waiting = (cs.get("state") or {}).get("waiting") or {}
                if waiting.get("reason") in FATAL_WAITING_REASONS:
                    message = (waiting.get("message") or "").strip()
                    problems.append(
                        f"pod {name} container {cs.get('name')}: {waiting['reason']}"
                        + (f" ({message[:300]})" if message else "")
                        + f", restarts {cs.get('restartCount', 0)}"
                    )
        return "; ".join(problems) or None

    def _pod_summary(self, dep: dict[str, Any], target_uri: str) -> str:
        try:
            pods = self._new_pods(dep, target_uri)
        except Exception as exc:  # a summary must not hide the real failure
            return f"(could not list pods: {_api_error(exc)})"
        if not pods:
            return "no new pod exists (quota, admission or scheduling: `kubectl describe rs`)"
        parts = []
        for pod in pods:
            status = pod.get("status") or {}
            ready = any(
                c.get("type") == "Ready" and c.get("status") == "True"
                for c in status.get("conditions") or []
            )
            detail = []
            for cs in status.get("containerStatuses") or []:
                state = cs.get("state") or {}
                reason = (state.get("waiting") or state.get("terminated") or {}).get("reason")
                if reason:
                    detail.append(reason)
                if cs.get("restartCount"):
                    detail.append(f"restarts {cs['restartCount']}")
            for cond in status.get("conditions") or []:
                if cond.get("status") == "False" and cond.get("reason") == "Unschedulable":
                    detail.append(f"unschedulable: {cond.get('message', '')[:200]}")
            parts.append(
                f"{pod['metadata']['name']} {status.get('phase', '?')}"
                f"{' ready' if ready else ' not ready'}"
                + (f" ({', '.join(detail)})" if detail else "")
            )
        return "; ".join(parts)

    # -- rollback ------------------------------------------------------------------------------

    def _previous_from_history(self, live: dict[str, Any]) -> Previous | None:
        """The newest older revision with another pod template (``rollout undo`` semantics)."""
        current = _revision(live)
        template = live["spec"]["template"]
        try:
            sets = self.kube.list_replica_sets(self.selector)
        except Exception as exc:
            log.warning("cannot read the revision history: %s", _api_error(exc))
            return None
        older = [
            rs
            for rs in sets
            if _revision(rs) < current
            and (
                template_model_uri(rs["spec"]["template"]) != template_model_uri(template)
                or template_image(rs["spec"]["template"]) != template_image(template)
            )
        ]
        if not older:
            return None
        rs = max(older, key=_revision)
        tmpl = copy.deepcopy(rs["spec"]["template"])
        (tmpl.get("metadata") or {}).get("labels", {}).pop("pod-template-hash", None)
        return Previous(
            template=tmpl,
            model_uri=template_model_uri(tmpl),
            source=f"ReplicaSet {rs['metadata']['name']} (revision {_revision(rs)})",
        )

    def _rollback_body(self, previous: Previous) -> dict[str, Any]:
        body = copy.deepcopy(self.desired)
        template = copy.deepcopy(previous.template)
        (template.get("metadata") or {}).pop("creationTimestamp", None)
        body["spec"]["template"] = template
        meta = body["metadata"]
        annotations = meta.setdefault("annotations", {})
        if previous.model_uri:
            annotations[manifests.MODEL_URI_ANNOTATION] = previous.model_uri
        if previous.version:
            annotations[manifests.MODEL_VERSION_ANNOTATION] = previous.version
            meta["labels"][manifests.VERSION_LABEL] = manifests.label_value(previous.version)
        else:
            annotations.pop(manifests.MODEL_VERSION_ANNOTATION, None)
            meta["labels"].pop(manifests.VERSION_LABEL, None)
        return body

    def _roll_back(self, previous: Previous | None, reason: str) -> RolloutResult:
        if previous is None:
            return self._result(
                "failed",
                EXIT_FAILED,
                f"rollout of version {self.version} failed: {reason}; there is no previous "
                "revision to roll back to, so it is left as it is",
            )
        from kubernetes.client.exceptions import ApiException

        log.error(
            "rollout of version %s failed: %s; rolling back to %s (%s)",
            self.version,
            reason,
            previous.model_uri,
            previous.source,
        )
        body = self._rollback_body(previous)
        try:
            with self._step("rollback"):
                try:
                    self._on_conflict("rollback apply")(self.kube.apply_deployment, body)
                except ApiException as exc:
                    raise RolloutFailed(f"apply failed: {_api_error(exc)}") from exc
                if previous.model_uri:
                    self._wait(previous.model_uri)
            smoke = self._smoke(previous.version, previous.model_uri)
        except Exception as exc:
            return self._result(
                "failed",
                EXIT_FAILED,
                f"rollout of version {self.version} failed: {reason}; AND the rollback to "
                f"{previous.model_uri} failed: {_api_error(exc)}",
                previous=previous,
            )
        return self._result(
            "rolled_back",
            EXIT_ROLLED_BACK,
            f"rollout of version {self.version} failed: {reason}; rolled back to "
            f"{previous.model_uri}, which serves again",
            smoke,
            previous=previous,
        )

    def _on_conflict(self, what: str) -> Retrying:
        """Retry a call on 409 Conflict with exponential backoff (0.5 s, 1 s, 2 s, ...)."""

        def warn(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            log.warning(
                "%s conflict (409, attempt %d/%d): %s; retrying in %.1fs",
                what,
                state.attempt_number,
                self.conflict_retries,
                _api_error(exc) if exc else "?",
                state.next_action.sleep if state.next_action else 0.0,
            )

        return Retrying(
            stop=stop_after_attempt(self.conflict_retries),
            wait=wait_exponential(multiplier=self.backoff_s, max=60),
            retry=retry_if_exception(lambda exc: getattr(exc, "status", None) == 409),
            sleep=self.sleep,
            before_sleep=warn,
            reraise=True,
        )

    def _result(
        self,
        status: str,
        exit_code: int,
        message: str,
        smoke: str | None = None,
        *,
        previous: Previous | None = None,
    ) -> RolloutResult:
        (log.info if exit_code == EXIT_OK else log.error)("%s: %s", status, message)
        return RolloutResult(
            status=status,
            exit_code=exit_code,
            model_uri=self.model_uri,
            version=self.version,
            namespace=self.settings.namespace,
            deployment=self.settings.deployment_name,
            message=message,
            previous_model_uri=previous.model_uri if previous else None,
            previous_version=previous.version if previous else None,
            smoke=smoke,
            seconds=round(self.clock() - self._started, 1),
            steps=list(self._steps),
        )


def _revision(obj: dict[str, Any]) -> int:
    value = ((obj.get("metadata") or {}).get("annotations") or {}).get(REVISION_ANNOTATION)
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _api_error(exc: BaseException) -> str:
    """An ApiException as `409 Conflict: <the API's message>`; anything else as str()."""
    status = getattr(exc, "status", None)
    body = getattr(exc, "body", None)
    if status is None or body is None:
        return str(exc)
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    return f"{status} {getattr(exc, 'reason', '')}: {message or str(body)[:300]}".strip()


# -- input examples ------------------------------------------------------------------------------


def mlflow_input_example(model_uri: str) -> str | None:
    """The model's serving input example (``serving_input_example.json``) from MLflow."""
    from mlflow.models.utils import load_serving_example

    example = load_serving_example(model_uri)
    if example is None:
        return None
    return example if isinstance(example, str) else json.dumps(example)


# -- the target ------------------------------------------------------------------------------


class KubernetesTarget:
    """The serving Deployment as a rollout target (:class:`serving.deploy.rollout.Target`).

    ``deploy`` is one :class:`Rollout` (apply, wait, smoke, and its own rollback to the
    previous pod template when the new pods never get ready or answer); verification and the
    alias moves are the shared rollout path's. One rollout at a time is Airflow's
    ``model_rollout`` pool: every rollout pod of every DAG runs in its one slot.
    """

    name = "kubernetes"

    def __init__(
        self,
        kube: KubeClient,
        settings: DeploySettings,
        *,
        tracking_uri: str,
        service_url: str | None = None,
        input_example: Callable[[str], str | None] | None = None,
        **rollout_options: Any,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.tracking_uri = tracking_uri
        self.service_url = service_url
        self.input_example = input_example or mlflow_input_example_or_none
        self.rollout_options = rollout_options

    @property
    def endpoint(self) -> str:
        return (
            self.service_url
            or self.settings.service_url
            or (
                f"http://{self.settings.deployment_name}.{self.settings.namespace}"
                f".svc.cluster.local:{manifests.SERVICE_PORT}"
            )
        ).rstrip("/")

    @contextmanager
    def lock(self, holder: str) -> Iterator[None]:
        log.info("rollout by %s (one at a time: Airflow's rollout pool)", holder)
        yield

    def live(self) -> Any:
        from serving.deploy.rollout import Live

        dep = self.kube.get_deployment()
        if dep is None:
            return Live(None, False, "the Deployment does not exist (bootstrap it first)")
        uri = template_model_uri((dep.get("spec") or {}).get("template") or {})
        state = RolloutState.of(dep)
        healthy = state.complete and state.available > 0
        return Live(_version_of(uri), healthy, state.summary())

    def deploy(self, model_uri: str, version: str) -> dict[str, Any]:
        from serving.deploy.rollout import DeployFailed

        result = Rollout(
            self.kube,
            self.settings,
            model_uri=model_uri,
            version=version,
            tracking_uri=self.tracking_uri,
            service_url=self.endpoint,
            input_example=self.input_example,
            **self.rollout_options,
        ).run()
        if result.exit_code != EXIT_OK:
            raise DeployFailed(result.message)
        return result.to_dict()

    def withdraw(self) -> None:
        # The namespace always has a Deployment (the bootstrap made it); scaling it away would
        # fight the HPA. The previous version keeps serving; a person decides.
        log.error(
            "kubernetes target: nothing to withdraw to; the Deployment keeps its current pods"
        )


def mlflow_input_example_or_none(model_uri: str) -> str | None:
    try:
        return mlflow_input_example(model_uri)
    except Exception as exc:  # the smoke test then checks the version only
        log.warning("no serving input example for %s: %s", model_uri, exc)
        return None
