"""A Kubernetes API test double: real HTTP on 127.0.0.1, for the real ``kubernetes`` client.

No cluster exists where these tests run. :class:`FakeCluster` is an ``http.server`` that speaks
the part of the Kubernetes REST API a rollout uses, with the API's paths, content types,
query parameters, status codes and ``Status`` error bodies:

    GET   /apis/apps/v1/namespaces/{ns}/deployments/{name}
    PATCH /apis/apps/v1/namespaces/{ns}/deployments/{name}   application/apply-patch+yaml only,
          ?fieldManager= required, ?force=; ``metadata.resourceVersion`` is a precondition (409)
    GET   /apis/apps/v1/namespaces/{ns}/replicasets?labelSelector=k=v,...
    GET   /api/v1/namespaces/{ns}/pods?labelSelector=k=v,...
    GET   /api/v1/namespaces/{ns}/services/{name}

and a tiny Deployment controller. Every GET of the Deployment advances it one step: it observes
a new generation (creating or re-using the ReplicaSet for the template, with the next
revision, like the real controller, so a rollback re-uses the old ReplicaSet), starts a surge
pod, and then behaves according to what is scripted for the template's model URI:

    ready            the new pods become ready after ``ticks_to_ready`` steps; old RS -> 0
    never_ready      the surge pod runs but never passes its readiness probe
    progress_deadline  as never_ready, then Progressing=False/ProgressDeadlineExceeded
    image_pull       the surge pod waits in ErrImagePull, then ImagePullBackOff
    crash            the surge pod is in CrashLoopBackOff
    wrong_version    like ready, but the pods report another model version

Like the rollout pod's RBAC (serving.manifests.rollout_rbac), applying a Deployment that does
not exist is Forbidden (an apply that creates needs ``create``).

:class:`FakeModelServer` imitates what the Service in front of the model-server pods answers
(``/ping``, ``/v1/model``, ``/invocations`` with ``X-Model-Version``), derived from which pods
of the fake cluster are ready, round robin, so old pods still serving show up as such.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

from serving.deploy.manifests import CONTAINER_NAME, MODEL_URI_ENV

REVISION = "deployment.kubernetes.io/revision"
WRONG_VERSION = "999"

_DEPLOYMENT = re.compile(r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/deployments/(?P<name>[^/]+)$")
_REPLICASETS = re.compile(r"^/apis/apps/v1/namespaces/(?P<ns>[^/]+)/replicasets$")
_PODS = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/pods$")
_SERVICE = re.compile(r"^/api/v1/namespaces/(?P<ns>[^/]+)/services/(?P<name>[^/]+)$")


@dataclass
class Patch:
    """One PATCH the double received (whatever its outcome)."""

    body: dict[str, Any]
    content_type: str
    field_manager: str | None
    force: str | None
    status: int

    @property
    def forced(self) -> bool:
        """``?force=`` as the API server parses a bool query parameter (apimachinery)."""
        if self.force is None:
            return False
        return not (self.force == "0" or self.force.lower() in ("false", "no"))

    @property
    def model_uri(self) -> str | None:
        return model_uri_of(self.body["spec"]["template"])


@dataclass
class Rollout:
    rs: str
    ticks: int = 0


@dataclass
class FakeCluster:
    namespace: str = "ml-serving"
    ticks_to_ready: int = 2
    deadline_ticks: int = 3
    behaviour: dict[str, str] = field(default_factory=dict)
    conflicts_to_inject: int = 0
    # GETs of the Deployment answered 503 before the real answer (an API server hiccup).
    unavailable_to_inject: int = 0
    deployments: dict[str, dict[str, Any]] = field(default_factory=dict)
    replica_sets: list[dict[str, Any]] = field(default_factory=list)
    pods: list[dict[str, Any]] = field(default_factory=list)
    services: dict[str, dict[str, Any]] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    patches: list[Patch] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.lock = threading.RLock()
        self._rv = itertools.count(1000)
        self._rollouts: dict[str, Rollout | None] = {}
        self._server: ThreadingHTTPServer | None = None
        self.url = ""

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> FakeCluster:
        cluster = self

        class Handler(_KubeHandler):
            pass

        Handler.cluster = cluster
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def api_client(self) -> Any:
        from kubernetes import client

        config = client.Configuration()
        config.host = self.url
        return client.ApiClient(config)

    def kubeconfig(self, path: str) -> str:
        """A kubeconfig for ``KUBECONFIG`` that points at the double."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {"token": "fake-token"}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {"cluster": "fake", "user": "fake", "namespace": self.namespace},
                }
            ],
            "current-context": "fake",
        }
        with open(path, "w") as fh:
            yaml.safe_dump(config, fh)
        return path

    # -- seeding and inspection ----------------------------------------------------------------

    def seed(self, manifest: dict[str, Any], *, replicas: int = 2) -> dict[str, Any]:
        """A Deployment from ``manifest`` whose rollout has completed (revision 1)."""
        with self.lock:
            dep = copy.deepcopy(manifest)
            name = dep["metadata"]["name"]
            meta = dep["metadata"]
            meta.update(
                uid=f"uid-{name}",
                generation=1,
                resourceVersion=str(next(self._rv)),
                creationTimestamp="2026-01-01T00:00:00Z",
                managedFields=[_managed("kubectl", "Apply")],
            )
            dep["spec"].setdefault("replicas", replicas)
            dep["status"] = {"observedGeneration": 0}
            self.deployments[name] = dep
            self._observe(dep, initial=True)
            self._complete(dep)
            return copy.deepcopy(dep)

    def apply_directly(self, name: str, manifest: dict[str, Any]) -> None:
        """Change the Deployment behind the rollout's back (another actor's apply)."""
        with self.lock:
            self._merge(self.deployments[name], manifest, "someone-else")

    def deployment(self, name: str) -> dict[str, Any]:
        with self.lock:
            return copy.deepcopy(self.deployments[name])

    def live_model_uri(self, name: str) -> str | None:
        return model_uri_of(self.deployment(name)["spec"]["template"])

    def applied(self) -> list[Patch]:
        """The PATCHes that were accepted (200)."""
        return [p for p in self.patches if p.status == 200]

    def ready_versions(self) -> list[str]:
        """What the Service would route to: the model version of each ready pod."""
        with self.lock:
            versions = []
            for pod in self.pods:
                if _pod_ready(pod):
                    uri = pod["metadata"]["annotations"]["fake/model-uri"]
                    if self.behaviour.get(uri) == "wrong_version":
                        versions.append(WRONG_VERSION)
                    else:
                        versions.append(uri.rsplit("/", 1)[-1])
            return versions

    # -- the API --------------------------------------------------------------------------------

    def handle(
        self, method: str, path: str, query: dict[str, list[str]], headers: Any, body: bytes
    ) -> tuple[int, dict[str, Any]]:
        with self.lock:
            self.requests.append((method, path))
            if m := _DEPLOYMENT.match(path):
                if m["ns"] != self.namespace:
                    return _status(404, "NotFound", f'namespaces "{m["ns"]}" not found')
                if method == "GET" and self.unavailable_to_inject > 0:
                    self.unavailable_to_inject -= 1
                    return _status(503, "ServiceUnavailable", "the server is shutting down")
                if method == "GET":
                    return self._get_deployment(m["name"])
                if method == "PATCH":
                    return self._patch_deployment(m["name"], query, headers, body)
                return _status(405, "MethodNotAllowed", f"{method} is not allowed")
            if method != "GET":
                return _status(405, "MethodNotAllowed", f"{method} is not allowed")
            selector = _parse_selector((query.get("labelSelector") or [""])[0])
            if (m := _REPLICASETS.match(path)) and m["ns"] == self.namespace:
                items = [rs for rs in self.replica_sets if _matches(rs, selector)]
                return 200, _list("apps/v1", "ReplicaSetList", items, next(self._rv))
            if (m := _PODS.match(path)) and m["ns"] == self.namespace:
                items = [p for p in self.pods if _matches(p, selector)]
                return 200, _list("v1", "PodList", items, next(self._rv))
            if (m := _SERVICE.match(path)) and m["ns"] == self.namespace:
                svc = self.services.get(m["name"])
                if svc is None:
                    return _status(404, "NotFound", f'services "{m["name"]}" not found')
                return 200, svc
            return _status(404, "NotFound", "the server could not find the requested resource")

    def _get_deployment(self, name: str) -> tuple[int, dict[str, Any]]:
        dep = self.deployments.get(name)
        if dep is None:
            return _status(404, "NotFound", f'deployments.apps "{name}" not found')
        self._reconcile(dep)
        return 200, dep

    def _patch_deployment(
        self, name: str, query: dict[str, list[str]], headers: Any, raw: bytes
    ) -> tuple[int, dict[str, Any]]:
        content_type = headers.get("Content-Type", "")
        field_manager = (query.get("fieldManager") or [None])[0]
        force = (query.get("force") or [None])[0]
        try:
            body = yaml.safe_load(raw)  # JSON is YAML: what the python client sends
        except yaml.YAMLError as exc:
            return _status(400, "BadRequest", f"error decoding YAML: {exc}")
        patch = Patch(body, content_type, field_manager, force, 0)
        self.patches.append(patch)
        result = self._apply(name, body, content_type, field_manager)
        patch.status = result[0]
        return result

    def _apply(
        self, name: str, body: Any, content_type: str, field_manager: str | None
    ) -> tuple[int, dict[str, Any]]:
        if content_type != "application/apply-patch+yaml":
            return _status(415, "UnsupportedMediaType", f"only apply patches here: {content_type}")
        if not field_manager:
            return _status(
                400, "BadRequest", "fieldManager is required for apply requests (PATCH apply)"
            )
        if not isinstance(body, dict) or body.get("kind") != "Deployment":
            return _status(400, "BadRequest", "the body is not a Deployment")
        if body.get("apiVersion") != "apps/v1" or body["metadata"].get("name") != name:
            return _status(400, "BadRequest", "apiVersion/name do not match the URL")
        dep = self.deployments.get(name)
        if dep is None:
            return _status(
                403,
                "Forbidden",
                f'deployments.apps "{name}" is forbidden: User '
                f'"system:serviceaccount:{self.namespace}:model-rollout" cannot create resource '
                f'"deployments" in API group "apps" in the namespace "{self.namespace}"',
            )
        conflict = (
            f'Operation cannot be fulfilled on deployments.apps "{name}": the object has been '
            "modified; please apply your changes to the latest version and try again"
        )
        if self.conflicts_to_inject > 0:
            self.conflicts_to_inject -= 1
            return _status(409, "Conflict", conflict)
        precondition = body["metadata"].get("resourceVersion")
        if precondition and precondition != dep["metadata"]["resourceVersion"]:
            return _status(409, "Conflict", conflict)
        self._merge(dep, body, field_manager)
        return 200, dep

    # -- the controller -------------------------------------------------------------------------

    def _merge(self, dep: dict[str, Any], body: dict[str, Any], manager: str) -> None:
        old_spec = copy.deepcopy(dep["spec"])
        meta, new_meta = dep["metadata"], body.get("metadata") or {}
        for key in ("labels", "annotations"):
            meta.setdefault(key, {}).update(new_meta.get(key) or {})
        for key, value in (body.get("spec") or {}).items():
            dep["spec"][key] = copy.deepcopy(value)
        if dep["spec"] != old_spec:
            meta["generation"] += 1
        meta["resourceVersion"] = str(next(self._rv))
        managers = [m for m in meta.get("managedFields", []) if m["manager"] != manager]
        meta["managedFields"] = [*managers, _managed(manager, "Apply")]

    def _reconcile(self, dep: dict[str, Any]) -> None:
        name = dep["metadata"]["name"]
        if dep["status"].get("observedGeneration", 0) < dep["metadata"]["generation"]:
            self._observe(dep)
            return
        rollout = self._rollouts.get(name)
        if rollout is None:
            return
        rollout.ticks += 1
        rs = self._rs(rollout.rs)
        uri = model_uri_of(rs["spec"]["template"])
        behaviour = self.behaviour.get(uri, "ready")
        if behaviour in ("ready", "wrong_version") and rollout.ticks >= self.ticks_to_ready:
            self._complete(dep)
        elif behaviour == "progress_deadline" and rollout.ticks >= self.deadline_ticks:
            _set_condition(
                dep,
                "Progressing",
                "False",
                "ProgressDeadlineExceeded",
                f'ReplicaSet "{rs["metadata"]["name"]}" has timed out progressing.',
            )
        elif behaviour == "image_pull":
            for pod in self._pods_of(rs):
                waiting = pod["status"]["containerStatuses"][0]["state"]["waiting"]
                waiting["reason"] = "ImagePullBackOff"
                waiting["message"] = f'Back-off pulling image "{_image(rs)}"'

    def _observe(self, dep: dict[str, Any], *, initial: bool = False) -> None:
        """The controller sees a new generation: new (or re-used) RS, one surge pod."""
        name = dep["metadata"]["name"]
        template = dep["spec"]["template"]
        revision = max((_revision(rs) for rs in self.replica_sets), default=0) + 1
        rs = next((r for r in self.replica_sets if _same_template(r, template)), None)
        if rs is None:
            pod_hash = hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()
            pod_hash = pod_hash[:10]
            rs_template = copy.deepcopy(template)
            rs_template["metadata"].setdefault("labels", {})["pod-template-hash"] = pod_hash
            rs = {
                "apiVersion": "apps/v1",
                "kind": "ReplicaSet",
                "metadata": {
                    "name": f"{name}-{pod_hash}",
                    "namespace": self.namespace,
                    "labels": dict(rs_template["metadata"]["labels"]),
                    "annotations": {},
                    "ownerReferences": [
                        {"apiVersion": "apps/v1", "kind": "Deployment", "name": name}
                    ],
                },
                "spec": {"replicas": 0, "template": rs_template},
                "status": {"replicas": 0},
            }
            self.replica_sets.append(rs)
        rs["metadata"]["annotations"][REVISION] = str(revision)
        dep["metadata"].setdefault("annotations", {})[REVISION] = str(revision)
        dep["status"]["observedGeneration"] = dep["metadata"]["generation"]
        self._rollouts[name] = Rollout(rs["metadata"]["name"])
        _set_condition(
            dep, "Progressing", "True", "NewReplicaSetCreated", "Created new replica set"
        )
        if initial:  # seed(): _complete() follows
            return
        uri = model_uri_of(template)
        behaviour = self.behaviour.get(uri, "ready")
        replicas = dep["spec"]["replicas"]
        for pod in self._pods_of(rs):  # a re-used RS starts over
            self.pods.remove(pod)
        rs["spec"]["replicas"] = 1
        state: dict[str, Any] = {"running": {"startedAt": "2026-01-01T00:00:01Z"}}
        restarts = 0
        if behaviour == "image_pull":
            state = {
                "waiting": {
                    "reason": "ErrImagePull",
                    "message": f'failed to pull image "{_image(rs)}": not found',
                }
            }
        elif behaviour == "crash":
            state = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 10s"}}
            restarts = 2
        self.pods.append(_pod(rs, 0, ready=False, state=state, restarts=restarts))
        dep["status"].update(
            replicas=replicas + 1,
            updatedReplicas=1,
            readyReplicas=replicas,
            availableReplicas=replicas,
            unavailableReplicas=1,
        )

    def _complete(self, dep: dict[str, Any]) -> None:
        name = dep["metadata"]["name"]
        rollout = self._rollouts.get(name)
        assert rollout is not None
        rs = self._rs(rollout.rs)
        replicas = dep["spec"]["replicas"]
        self.pods = [p for p in self.pods if not _matches(p, {})]  # one Deployment only
        for other in self.replica_sets:
            other["spec"]["replicas"] = 0
            other["status"]["replicas"] = 0
        rs["spec"]["replicas"] = replicas
        rs["status"]["replicas"] = replicas
        running = {"running": {"startedAt": "2026-01-01T00:00:02Z"}}
        self.pods.extend(_pod(rs, i, ready=True, state=running) for i in range(replicas))
        dep["status"].update(
            replicas=replicas,
            updatedReplicas=replicas,
            readyReplicas=replicas,
            availableReplicas=replicas,
            unavailableReplicas=0,
        )
        _set_condition(dep, "Available", "True", "MinimumReplicasAvailable", "ok")
        _set_condition(
            dep,
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            f'ReplicaSet "{rs["metadata"]["name"]}" has successfully progressed.',
        )
        self._rollouts[name] = None

    def _rs(self, name: str) -> dict[str, Any]:
        return next(rs for rs in self.replica_sets if rs["metadata"]["name"] == name)

    def _pods_of(self, rs: dict[str, Any]) -> list[dict[str, Any]]:
        pod_hash = rs["metadata"]["labels"]["pod-template-hash"]
        return [p for p in self.pods if p["metadata"]["labels"]["pod-template-hash"] == pod_hash]


class _KubeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    cluster: FakeCluster

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _serve(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, obj = self.cluster.handle(
            self.command, url.path, parse_qs(url.query), self.headers, body
        )
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_PATCH = do_POST = do_PUT = do_DELETE = _serve


# -- the model server behind the Service --------------------------------------------------------


class FakeModelServer:
    """What ``http://<service>`` answers, from the fake cluster's ready pods (round robin)."""

    def __init__(
        self,
        cluster: FakeCluster,
        *,
        version_header: bool = True,
        predictor: Any = None,
    ) -> None:
        """``predictor(version, dataframe_split) -> list[float]``: what a pod of that version
        answers (default: 0.5 for every row)."""
        self.cluster = cluster
        self.version_header = version_header
        self.predictor = predictor
        self.invocations: list[dict[str, Any]] = []
        self._next = itertools.count()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server._answer(self, None)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                server._answer(self, self.rfile.read(length))

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _answer(self, handler: BaseHTTPRequestHandler, body: bytes | None) -> None:
        versions = self.cluster.ready_versions()
        path = handler.path
        if not versions:
            status, obj, version = 503, {"error_code": "TEMPORARILY_UNAVAILABLE"}, None
        else:
            version = versions[next(self._next) % len(versions)]
            if path == "/invocations" and body is not None:
                payload = json.loads(body)
                self.invocations.append(payload)
                split = payload["dataframe_split"]
                if self.predictor is None:
                    values = [0.5] * len(split["data"])
                else:
                    values = self.predictor(version, split)
                status, obj = 200, {"predictions": [{"prediction": v} for v in values]}
            elif path == "/v1/model":
                status, obj = 200, {"name": "regression-model", "version": version}
            elif path in ("/ping", "/health"):
                status, obj = 200, {}
            else:
                status, obj = 404, {"error_code": "NOT_FOUND"}
        data = json.dumps(obj).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        if version is not None and self.version_header:
            handler.send_header("X-Model-Version", version)
        handler.end_headers()
        handler.wfile.write(data)


# -- helpers ------------------------------------------------------------------------------------


def model_uri_of(template: dict[str, Any]) -> str | None:
    for c in template["spec"]["containers"]:
        if c["name"] == CONTAINER_NAME:
            for env in c.get("env") or []:
                if env["name"] == MODEL_URI_ENV:
                    return env["value"]
    return None


def _image(rs: dict[str, Any]) -> str:
    return rs["spec"]["template"]["spec"]["containers"][0]["image"]


def _status(code: int, reason: str, message: str) -> tuple[int, dict[str, Any]]:
    return code, {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _list(api_version: str, kind: str, items: list[dict[str, Any]], rv: int) -> dict[str, Any]:
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"resourceVersion": str(rv)},
        # List items carry no kind/apiVersion, like the real API.
        "items": [{k: v for k, v in i.items() if k not in ("kind", "apiVersion")} for i in items],
    }


def _managed(manager: str, operation: str) -> dict[str, Any]:
    return {
        "manager": manager,
        "operation": operation,
        "apiVersion": "apps/v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {"f:spec": {"f:template": {}}},
    }


def _parse_selector(selector: str) -> dict[str, str]:
    pairs = [part.split("=", 1) for part in selector.split(",") if part]
    return {k.strip(): v.strip() for k, v in pairs}


def _matches(obj: dict[str, Any], selector: dict[str, str]) -> bool:
    labels = obj["metadata"].get("labels") or {}
    return all(labels.get(k) == v for k, v in selector.items())


def _same_template(rs: dict[str, Any], template: dict[str, Any]) -> bool:
    mine = copy.deepcopy(rs["spec"]["template"])
    mine["metadata"]["labels"].pop("pod-template-hash", None)
    return mine == template


def _revision(obj: dict[str, Any]) -> int:
    return int((obj["metadata"].get("annotations") or {}).get(REVISION, 0))


def _set_condition(dep: dict[str, Any], kind: str, status: str, reason: str, message: str) -> None:
    conditions = [c for c in dep["status"].get("conditions", []) if c["type"] != kind]
    conditions.append({"type": kind, "status": status, "reason": reason, "message": message})
    dep["status"]["conditions"] = conditions


def _pod(
    rs: dict[str, Any],
    index: int,
    *,
    ready: bool,
    state: dict[str, Any],
    restarts: int = 0,
) -> dict[str, Any]:
    template = rs["spec"]["template"]
    name = f"{rs['metadata']['name']}-{index}{'r' if ready else 's'}"
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": rs["metadata"]["namespace"],
            "labels": dict(template["metadata"]["labels"]),
            "annotations": {"fake/model-uri": model_uri_of(template)},
        },
        "spec": {"containers": copy.deepcopy(template["spec"]["containers"])},
        "status": {
            "phase": "Running" if "running" in state else "Pending",
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
            "containerStatuses": [
                {
                    "name": CONTAINER_NAME,
                    "image": _image(rs),
                    "imageID": "",
                    "ready": ready,
                    "restartCount": restarts,
                    "state": copy.deepcopy(state),
                }
            ],
        },
    }


def _pod_ready(pod: dict[str, Any]) -> bool:
    return any(c["type"] == "Ready" and c["status"] == "True" for c in pod["status"]["conditions"])
