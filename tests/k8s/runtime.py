"""What the nodes' containers would do, for the ``k8s`` tier: the one double in it.

The control plane is real (tests/k8s/cluster.py); no container runtime can run here. Two
pieces stand in for the node's kubelet runtime and kube-proxy, each reading the real API:

* :class:`ServiceProxy` is the serving Service as a client reaches it. Each connection goes
  to one of the Service's *ready* endpoints, as the real EndpointSlice controller lists them,
  and from that pod to a real model server (``python -m serving.server``) started for the
  pod's pinned ``MODEL_URI``: one process per model version, shared by that version's pods.
  So during a rolling update the answers come from both versions, as through a real Service,
  and a Service without ready endpoints refuses connections.
* :class:`PodRunner` runs the command of run-to-completion pods (the pipeline's
  KubernetesPodOperator pods) as a local process, with the pod's env and, when the pod mounts
  its ServiceAccount token, a kubeconfig holding a real token of that ServiceAccount: RBAC
  decides its API calls as in the pod. Its output goes to KWOK's log server (``kubectl logs``
  works) and its exit code ends the pod (the ``pod-exit`` stage of tests/k8s/stages.yaml).

In-cluster DNS does not exist here: a pod's process reaches the Service through
``PIPELINE_DEPLOY_SERVICE_URL``, set to the proxy.
"""

from __future__ import annotations

import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from serving.server.contract import MODEL_URI_ENV
from tests.ports import free_port

REPO = Path(__file__).resolve().parents[2]
EXIT_ANNOTATION = "runtime.test.train-and-deploy/exit-code"


class ModelServers:
    """One real model server per pinned model URI, started on first use."""

    def __init__(self, tracking_uri: str, logs: Path) -> None:
        self.tracking_uri, self.logs = tracking_uri, logs
        self._servers: dict[str, tuple[subprocess.Popen, int]] = {}
        self._lock = threading.Lock()

    def port(self, model_uri: str, timeout: float = 90.0) -> int | None:
        """The port of a ready server for ``model_uri`` (None if it never gets ready)."""
        with self._lock:
            if model_uri not in self._servers:
                port = free_port()
                self.logs.mkdir(parents=True, exist_ok=True)
                name = model_uri.replace(":/", "-").replace("/", "-")
                log = open(self.logs / f"server-{name}.log", "ab")  # noqa: SIM115
                proc = subprocess.Popen(
                    [sys.executable, "-m", "serving.server", "--model-uri", model_uri,
                     "--host", "127.0.0.1", "--port", str(port), "--no-access-log"],
                    env={**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri},
                    cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                )  # fmt: skip
                self._servers[model_uri] = (proc, port)
            proc, port = self._servers[model_uri]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=2).status_code == 200:
                    return port
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        return None

    def stop(self) -> None:
        for proc, _ in self._servers.values():
            proc.terminate()
        for proc, _ in self._servers.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


class ServiceProxy:
    """A Service's data plane: each connection to one of its ready endpoints' model server."""

    def __init__(self, api_client: Any, namespace: str, service: str, servers: ModelServers):
        from kubernetes import client

        self.core = client.CoreV1Api(api_client)
        self.discovery = client.DiscoveryV1Api(api_client)
        self.namespace, self.service, self.servers = namespace, service, servers
        self._next = 0
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._relay(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def ready_model_uris(self) -> list[str]:
        """The pinned model URI of every ready endpoint of the Service, as listed now."""
        slices = self.discovery.list_namespaced_endpoint_slice(
            self.namespace, label_selector=f"kubernetes.io/service-name={self.service}"
        ).items
        ready = {
            e.target_ref.name
            for s in slices
            for e in s.endpoints or []
            if e.conditions and e.conditions.ready and e.target_ref
        }
        uris = []
        for pod in self.core.list_namespaced_pod(self.namespace).items:
            if pod.metadata.name in ready:
                env = {e.name: e.value for e in pod.spec.containers[0].env or []}
                uris.append(env.get(MODEL_URI_ENV))
        return sorted(u for u in uris if u)

    def _relay(self, conn: socket.socket) -> None:
        try:
            uris = self.ready_model_uris()
        except Exception as exc:  # the API server is down: so is kube-proxy's view of it
            print(f"service proxy: {exc!r}", file=sys.stderr)
            uris = []
        if not uris:
            conn.close()  # no ready endpoint: a Service refuses the connection
            return
        self._next += 1
        port = self.servers.port(uris[self._next % len(uris)])
        if port is None:
            print(f"service proxy: no model server for {uris}", file=sys.stderr)
            conn.close()
            return
        with socket.create_connection(("127.0.0.1", port)) as upstream:
            pump = threading.Thread(target=_pipe, args=(upstream, conn), daemon=True)
            pump.start()
            _pipe(conn, upstream)
            pump.join(30)
        conn.close()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _pipe(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
        dst.shutdown(socket.SHUT_WR)
    except OSError:
        pass


class PodRunner:
    """Runs the command of each run-to-completion pod matching ``selector`` as a process."""

    def __init__(self, plane: Any, root: Path, *, selector: str, env: dict[str, str]) -> None:
        from kubernetes import client

        self.plane, self.root, self.selector, self.env = plane, root, selector, env
        self.core = client.CoreV1Api(plane.api_client())
        self.started: dict[str, subprocess.Popen] = {}
        self.exit_codes: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                for pod in self.core.list_pod_for_all_namespaces(
                    label_selector=self.selector
                ).items:
                    key = f"{pod.metadata.namespace}/{pod.metadata.name}"
                    if key not in self.started and pod.status.phase == "Running":
                        self.started[key] = self._start(pod)
                for key, proc in list(self.started.items()):
                    if key not in self.exit_codes and proc.poll() is not None:
                        self._finish(key, proc.returncode)
            except Exception as exc:  # the API server may be down on purpose: try again
                print(f"pod runner: {exc!r}", file=sys.stderr)
            self._stop.wait(0.2)

    def _start(self, pod: Any) -> subprocess.Popen:
        namespace, name = pod.metadata.namespace, pod.metadata.name
        container = pod.spec.containers[0]
        home = self.root / namespace / name
        home.mkdir(parents=True, exist_ok=True)
        env = {"PATH": os.environ["PATH"], "PYTHONDONTWRITEBYTECODE": "1"}
        env |= {e.name: e.value for e in container.env or [] if e.value is not None}
        env |= {"HOME": str(home), "TMPDIR": str(home), **self.env}
        if pod.spec.automount_service_account_token:
            sa = pod.spec.service_account_name or "default"
            env["KUBECONFIG"] = str(
                self.plane.token_kubeconfig(namespace, sa, home / "serviceaccount.kubeconfig")
            )
        command = [*(container.command or []), *(container.args or [])]
        if command and command[0] == "python":
            command[0] = sys.executable
        log_path = home / "container.log"
        log_path.touch()
        proc = subprocess.Popen(
            command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        done = threading.Event()
        CONTAINERS[(namespace, name, container.name)] = (log_path, done)
        threading.Thread(target=_log_output, args=(proc, log_path, done), daemon=True).start()
        return proc

    def _finish(self, key: str, code: int) -> None:
        namespace, name = key.split("/")
        patch = {"metadata": {"annotations": {EXIT_ANNOTATION: str(code)}}}
        self.core.patch_namespaced_pod(name, namespace, patch)
        self.exit_codes[key] = code

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for proc in self.started.values():
            if proc.poll() is None:
                proc.kill()


# (namespace, pod, container) -> (its log file, set once its process ended): what the
# kubelet log endpoint serves.
CONTAINERS: dict[tuple[str, str, str], tuple[Path, threading.Event]] = {}


def _log_output(proc: subprocess.Popen, path: Path, done: threading.Event) -> None:
    """The process's output, each line stamped as a kubelet stamps it (``timestamps=true``)."""
    with open(path, "a", buffering=1) as out:
        for raw in proc.stdout:
            stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
            out.write(f"{stamp} {raw.decode(errors='replace').rstrip()}\n")
    proc.wait()
    done.set()


class KubeletLogs:
    """The nodes' kubelet log endpoint (``GET /containerLogs/<ns>/<pod>/<container>`` on port
    10250, over TLS; the API server proxies ``kubectl logs`` and the operator's log stream
    here) for the processes :class:`PodRunner` runs. As a kubelet's, a followed stream ends
    when the container does. (KWOK's own log server follows a file for ever: the operator
    would wait minutes for a pod that has long ended.)"""

    def __init__(self, cert: Path, key: Path, port: int) -> None:
        import ssl
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                _serve_logs(self)

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self._server.daemon_threads = True
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(cert, key)
        self._server.socket = tls.wrap_socket(self._server.socket, server_side=True)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def _after(stamp: str, since: str) -> bool:
    return datetime.fromisoformat(stamp) > datetime.fromisoformat(since)


def _serve_logs(request: Any) -> None:
    from urllib.parse import parse_qs, urlsplit

    url = urlsplit(request.path)
    parts = url.path.strip("/").split("/")
    found = CONTAINERS.get(tuple(parts[1:4])) if parts[0] == "containerLogs" else None
    if found is None or len(parts) != 4:
        request.send_error(404, "no such container")
        return
    query = {k: v[-1] for k, v in parse_qs(url.query).items()}
    path, done = found
    follow = query.get("follow") == "true"
    stamps = query.get("timestamps") == "true"
    since = query.get("sinceTime")
    request.send_response(200)
    request.send_header("Content-Type", "text/plain")
    request.send_header("Transfer-Encoding", "chunked")
    request.end_headers()

    def send(data: bytes) -> None:
        request.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        request.wfile.flush()

    with open(path, "rb") as logs:
        while True:
            ended = done.is_set()  # before reading: all its output is in the file then
            line = logs.readline()
            if line.endswith(b"\n"):
                stamp, _, text = line.partition(b" ")
                if not since or _after(stamp.decode(), since):
                    send(line if stamps else text)
            elif ended or not follow:
                break
            else:
                time.sleep(0.1)
    request.wfile.write(b"0\r\n\r\n")
    request.close_connection = True
