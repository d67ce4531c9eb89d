"""The Kubernetes API calls of a rollout, as plain dicts (camelCase, as served), each retried
while the API server does not answer (tenacity), then a fault (:class:`DeployFailed`); a 401
or 403 is a refusal (:class:`TargetRejected`). :mod:`serving.deploy.kubernetes` decides what
to call; :mod:`serving.deploy.kube_objects` reads what comes back.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from tenacity import Retrying, retry_if_exception, stop_after_delay, wait_exponential

from serving.deploy.kube_objects import api_error, owned_by, transient
from serving.deploy.manifests import FIELD_MANAGER
from serving.deploy.settings import DeploySettings
from serving.deploy.target import DeployFailed, TargetRejected

log = logging.getLogger(__name__)
T = TypeVar("T")


class KubeApi:
    """The calls a rollout makes on one Deployment, as plain dicts (camelCase, as served).

    The rollout ServiceAccount's Role allows exactly these (docker/k8s/base/rbac.yaml):
    get/watch/patch the Deployment and its ``scale``, list ReplicaSets and Pods.
    """

    def __init__(self, api_client: Any, namespace: str, name: str, *, retry_s: float = 60.0):
        from kubernetes import client

        self.namespace, self.name, self.retry_s = namespace, name, retry_s
        self.apps = client.AppsV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self.version_api = client.VersionApi(api_client)

    @classmethod
    def from_environment(cls, settings: DeploySettings) -> KubeApi:
        """In-cluster credentials inside a pod, else ``KUBECONFIG`` (or ~/.kube/config)."""
        import os

        from kubernetes import client, config

        if os.environ.get("KUBERNETES_SERVICE_HOST"):
            config.load_incluster_config()
        else:
            config.load_kube_config(config_file=os.environ.get("KUBECONFIG") or None)
        api = client.ApiClient()
        log.info("Kubernetes API %s", api.configuration.host)
        return cls(api, settings.namespace, settings.deployment_name, retry_s=settings.api_retry_s)

    def call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, retried while the API server does not answer; then :class:`DeployFailed`."""

        def warn(state: Any) -> None:
            log.warning("%s: %s; retrying", what, api_error(state.outcome.exception()))

        try:
            return Retrying(
                stop=stop_after_delay(self.retry_s),
                wait=wait_exponential(multiplier=0.25, max=4),
                retry=retry_if_exception(transient),
                before_sleep=warn,
                reraise=True,
            )(fn)
        except Exception as exc:
            if getattr(exc, "status", None) in (401, 403):  # the same answer on every retry
                raise TargetRejected(f"{what}: {api_error(exc)}") from exc
            if transient(exc):
                problem = api_error(exc)
                raise DeployFailed(f"{what}: no answer for {self.retry_s:g}s: {problem}") from exc
            raise

    def _json(self, what: str, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        return self.call(
            what, lambda: json.loads(method(*args, **kwargs, _preload_content=False).data)
        )

    def sibling(self, name: str) -> KubeApi:
        """The same calls on another Deployment of the namespace (the canary)."""
        other = copy.copy(self)
        other.name = name
        return other

    def apply_route(self, body: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of the HTTPRoute ``body`` (Gateway API)."""
        from kubernetes import client

        routes = client.CustomObjectsApi(self.apps.api_client)
        group, version = body["apiVersion"].split("/")
        return self._json("APPLY httproute", routes.patch_namespaced_custom_object, group,
                          version, self.namespace, "httproutes", body["metadata"]["name"], body,
                          field_manager=FIELD_MANAGER, force=True,
                          _content_type="application/apply-patch+yaml")  # fmt: skip

    def server_version(self) -> tuple[int, int]:
        info = self.call("GET /version", self.version_api.get_code)
        minor = re.match(r"\d+", info.minor or "")
        return int(info.major), int(minor[0]) if minor else 0

    def get(self) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._json("GET deployment", self.apps.read_namespaced_deployment,
                              self.name, self.namespace)  # fmt: skip
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def apply(self, body: dict[str, Any]) -> dict[str, Any]:
        return self._json("APPLY deployment", self.apps.patch_namespaced_deployment, self.name,
                          self.namespace, body, field_manager=FIELD_MANAGER, force=True,
                          _content_type="application/apply-patch+yaml")  # fmt: skip

    def scale(self, replicas: int) -> None:
        self._json("PATCH deployment/scale", self.apps.patch_namespaced_deployment_scale,
                   self.name, self.namespace, {"spec": {"replicas": replicas}})  # fmt: skip

    def watch(self, resource_version: str, timeout_s: float) -> Iterator[dict[str, Any]]:
        """The Deployment as it changes, from ``resource_version``, for up to ``timeout_s``."""
        from kubernetes import watch

        stream = watch.Watch().stream(
            self.apps.list_namespaced_deployment, self.namespace,
            field_selector=f"metadata.name={self.name}", resource_version=resource_version,
            timeout_seconds=max(1, int(timeout_s)),
        )  # fmt: skip
        for event in stream:
            if event["type"] in ("ADDED", "MODIFIED"):
                yield event["raw_object"]

    def replica_sets(self, selector: str) -> list[dict[str, Any]]:
        """This Deployment's ReplicaSets among those ``selector`` selects."""
        found = self._json("LIST replicasets", self.apps.list_namespaced_replica_set,
                           self.namespace, label_selector=selector)["items"]  # fmt: skip
        return [rs for rs in found if owned_by(rs, self.name)]

    def pods(self, selector: str) -> list[dict[str, Any]]:
        return self._json("LIST pods", self.core.list_namespaced_pod, self.namespace,
                          label_selector=selector)["items"]  # fmt: skip
