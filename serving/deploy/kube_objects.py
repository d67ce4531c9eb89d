"""Reading the Kubernetes objects of a rollout, and the API's errors: pure functions.

Plain dicts as the API server serves them (camelCase); :mod:`serving.deploy.kubernetes` does
the I/O and decides with these.
"""

from __future__ import annotations

import json
import re
from typing import Any

from serving.deploy.manifests import MODEL_URI_ENV, parse_pinned_uri

REVISION_ANNOTATION = "deployment.kubernetes.io/revision"
TRANSIENT_STATUSES = {429, 500, 502, 503, 504}


def model_uri_of(template: dict[str, Any]) -> str | None:
    """The pinned model URI a pod template runs (its ``MODEL_URI`` env var)."""
    for container in (template.get("spec") or {}).get("containers") or []:
        for env in container.get("env") or []:
            if env.get("name") == MODEL_URI_ENV:
                return env.get("value")
    return None


def version_of(template: dict[str, Any]) -> str | None:
    try:
        return parse_pinned_uri(model_uri_of(template) or "")[1]
    except ValueError:
        return None


def rollout_state(dep: dict[str, Any]) -> tuple[str, str]:
    """``kubectl rollout status`` of one Deployment: (``complete``|``waiting``|``stuck``, why)."""
    spec, status = dep.get("spec") or {}, dep.get("status") or {}
    if (status.get("observedGeneration") or 0) < (dep["metadata"].get("generation") or 0):
        return "waiting", "the controller has not seen the new spec yet"
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Progressing" and cond.get("reason") == "ProgressDeadlineExceeded":
            return "stuck", f"ProgressDeadlineExceeded: {cond.get('message', '')}"
    want = spec.get("replicas", 1)
    updated, total = status.get("updatedReplicas", 0), status.get("replicas", 0)
    available = status.get("availableReplicas", 0)
    summary = f"{updated} updated, {available} available, {total} in all, {want} wanted"
    if updated < want or total > updated or available < updated:
        return "waiting", summary
    return "complete", summary


def revision(obj: dict[str, Any]) -> int:
    value = (obj["metadata"].get("annotations") or {}).get(REVISION_ANNOTATION, "0")
    return int(value) if str(value).isdigit() else 0


def describe_pods(pods: list[dict[str, Any]]) -> tuple[bool, str]:
    """(a verdict?, the pods in words). A verdict when a pod started and is not ready: its
    server ran and failed its probe. Pods not scheduled, not pulled or not created are not."""
    if not pods:
        return False, "no new pod was created (quota or admission: `kubectl describe rs`)"
    words, verdict = [], False
    for pod in pods:
        status = pod.get("status") or {}
        conditions = {c.get("type"): c for c in status.get("conditions") or []}
        ready = conditions.get("Ready", {}).get("status") == "True"
        started = any(c.get("started") for c in status.get("containerStatuses") or [])
        verdict = verdict or (started and not ready)
        why = [c.get("message", "")[:150] for c in conditions.values()
               if c.get("status") == "False" and c.get("message")]  # fmt: skip
        state = "ready" if ready else "started, not ready" if started else "not started"
        words.append(f"{pod['metadata']['name']} {status.get('phase', '?')} {state}"
                     + (f" ({'; '.join(why)})" if why else ""))  # fmt: skip
    return verdict, "; ".join(words)


def owned_by(obj: dict[str, Any], name: str) -> bool:
    """``obj`` (a ReplicaSet) is controlled by the Deployment ``name`` (the serving Deployment
    and its canary select each other's pods' labels: only the owner tells them apart)."""
    owners = obj["metadata"].get("ownerReferences") or []
    return any(o.get("controller") and o.get("name") == name for o in owners)


def template_key(template: dict[str, Any]) -> tuple[str | None, str | None]:
    """What makes two pod templates the same rollout: the pinned model and the image."""
    containers = (template.get("spec") or {}).get("containers") or [{}]
    return model_uri_of(template), containers[0].get("image")


def transient(exc: BaseException) -> bool:
    from kubernetes.client.exceptions import ApiException
    from urllib3.exceptions import HTTPError

    if isinstance(exc, ApiException):
        return exc.status in TRANSIENT_STATUSES and not unknown_field(exc)
    return isinstance(exc, HTTPError | ConnectionError | TimeoutError)


def unknown_field(exc: BaseException) -> str | None:
    """The field an older API server does not know, from its error message: server-side
    apply's ``<path>: field not declared in schema`` (a path such as
    ``.spec.template.spec.containers[name="model-server"].lifecycle.preStop.sleep``) or strict
    validation's ``unknown field "<path>"``."""
    text = api_message(exc)
    match = re.search(r"([^\s:]+): field not declared in schema", text)
    match = match or re.search(r'unknown field "([^"]+)"', text)
    return match[1] if match else None


def api_message(exc: BaseException | None) -> str:
    """The ``message`` of the Status in an API error's body (JSON bytes, a path's quotes
    escaped), else the body's text."""
    body = getattr(exc, "body", None) or ""
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    try:
        message = json.loads(body).get("message")
    except (ValueError, AttributeError):
        message = None
    return message if isinstance(message, str) else str(body)[:300]


def api_error(exc: BaseException | None) -> str:
    """An ApiException as ``409 Conflict: <the API's message>``; anything else as repr()."""
    if getattr(exc, "status", None) is None:
        return repr(exc)
    message = api_message(exc) if getattr(exc, "body", None) else ""
    return f"{exc.status} {getattr(exc, 'reason', '')}: {message}".rstrip(": ")
