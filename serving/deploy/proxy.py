"""The local stand-in for a Kubernetes Service and a Gateway's HTTPRoute: a stable front port
that routes every request.

The proxy listens on ``DeploySettings.local_host:local_port``, parses each request (httptools,
on uvloop) and picks its upstream from ``<local_state_dir>/active.json``, which the deployer
(:mod:`serving.deploy.local`) replaces atomically:

- ``port``: the live model server. Every request goes there, except during a canary:
- ``candidate.weight`` (0 to 1): that share of the ``POST /invocations`` requests goes to the
  candidate on ``candidate.port``, chosen per request (not per connection: a keep-alive client
  is split like any other). Everything else (``/ping``, ``/metrics``, ``/v1/model``) stays on
  the live server. A candidate that refuses the connection gets nothing: the request goes to
  the live server.
- ``candidate.mirror`` (0 to 1): that share of the requests the live server answered with 200
  is sent again to the candidate, *after* the caller has its answer, with the live answer in
  :data:`~serving.server.contract.LIVE_ANSWER_HEADER` (the candidate records the paired
  differences: ``serving.server.shadow``); what waits for a mirror connection is merged into
  fewer, bigger requests, and a dead or slow shadow changes nothing for callers
  (:mod:`serving.deploy.mirror`).

A switch of ``port`` (a new version goes live) applies from the next request on, also on
connections already open; the deployer stops the old server after a short drain, and a request
whose upstream connection closes before any byte of its answer came back is sent again on a
new connection (model predictions are pure: repeating one is safe). Upstream connections are
kept alive per client connection. When nothing is deployed, or the live server refuses, the
proxy answers itself (``503 NO_MODEL_DEPLOYED`` / ``502 UPSTREAM_UNAVAILABLE``, MLflow's error
shape). Upstreams are always ``127.0.0.1``: ``active.json`` names ports, never hosts.

It also runs the local target's kubelet (:class:`serving.deploy.supervisor.Supervisor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
import time
from collections import deque
from pathlib import Path
from typing import Any

import httptools

from serving.deploy.mirror import Mirror
from serving.deploy.settings import DeploySettings
from serving.deploy.supervisor import ACTIVE_FILE, PROXY_PIDFILE, UPSTREAM_HOST, Supervisor

log = logging.getLogger("serving.proxy")

_CONNECT_TIMEOUT_S = 5.0
# On SIGTERM: stop accepting, give requests in flight this long to finish, then cut them.
_SHUTDOWN_GRACE_S = 5.0
# A request body larger than this is refused here (413) rather than held in memory.
MAX_BODY_BYTES = 64 * 1024 * 1024
# A client that pipelines more requests than this is not read until they are answered.
_MAX_QUEUED = 64
# Request headers that belong to one hop: the proxy sets its own framing upstream.
_HOP_BY_HOP = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"te",
     b"content-length", b"expect", b"upgrade"}
)  # fmt: skip


class Routes:
    """Where requests go now: ``active.json``, looked at (one ``stat``) for every request.

    Change detection uses (mtime_ns, inode, size): the deployer writes a temp file and
    ``os.replace``s it, so every switch produces a new inode even within one mtime tick.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.record: dict[str, Any] | None = None
        self.port: int | None = None
        self.candidate_port: int | None = None
        self.weight = self.mirror = 0.0
        self._key: tuple[int, int, int] | None = None

    def refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self.record is not None:
                log.info("switch: %s -> nothing deployed (%s removed)", _name(self.record),
                         self.path.name)  # fmt: skip
            self._key, self.record, self.port, self.candidate_port = None, None, None, None
            return
        key = (st.st_mtime_ns, st.st_ino, st.st_size)
        if key == self._key:
            return
        self._key = key
        try:
            record = json.loads(self.path.read_text())
            port = _port(record["port"])
            candidate = record.get("candidate") or None
            candidate_port = _port(candidate["port"]) if candidate else None
            weight = _share(candidate.get("weight", 0)) if candidate else 0.0
            mirror = _share(candidate.get("mirror", 0)) if candidate else 0.0
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Writes are atomic, so this is a hand edit gone wrong: keep routing as before.
            log.warning("ignoring unreadable %s (%s); routing as before", self.path, exc)
            return
        old, self.record = self.record, record
        if old is None or _name(old) != _name(record):
            log.info("switch: %s -> %s (%s)", _name(old) if old else "nothing", _name(record),
                     record.get("model_uri"))  # fmt: skip
        if (candidate_port, weight, mirror) != (self.candidate_port, self.weight, self.mirror):
            log.info(
                "candidate: %s",
                f"version {candidate.get('version')} (port {candidate_port}): {weight:.0%} of "
                f"the predictions, {mirror:.0%} mirrored"
                if candidate
                else "none",
            )
        self.port, self.candidate_port, self.weight, self.mirror = (
            port, candidate_port, weight, mirror
        )  # fmt: skip


def _name(record: dict[str, Any]) -> str:
    return f"version {record.get('version')} (port {record.get('port')})"


def _port(value: Any) -> int:
    port = int(value)
    if not 0 < port < 65_536:
        raise ValueError(f"port out of range: {port}")
    return port


def _share(value: Any) -> float:
    share = float(value)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"a share must be within 0 and 1, got {share}")
    return share


class _Request:
    __slots__ = (
        "body",
        "canary",
        "head",
        "invocation",
        "keep_alive",
        "method",
        "mirror",
        "retried",
    )  # fmt: skip

    def __init__(self, head: bytes, body: bytes, method: bytes, keep_alive: bool, url: bytes):
        self.head, self.body, self.method, self.keep_alive = head, body, method, keep_alive
        self.invocation = method == b"POST" and url.startswith(b"/invocations")
        self.canary = self.mirror = self.retried = False


def _error(status: int, code: str, message: str, *, close: bool = False) -> bytes:
    """An HTTP answer in MLflow's error shape."""
    body = json.dumps({"error_code": code, "message": message}).encode()
    reason = {400: "Bad Request", 413: "Content Too Large", 502: "Bad Gateway",
              503: "Service Unavailable"}.get(status, "Error")  # fmt: skip
    connection = "connection: close\r\n" if close else ""
    head = f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
    return f"{head}content-length: {len(body)}\r\n{connection}\r\n".encode() + body


class Front(asyncio.Protocol):
    """One client connection: its requests, answered one after another, each routed anew."""

    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.queue: deque[_Request] = deque()
        self.current: _Request | None = None
        self.upstreams: dict[int, Upstream] = {}
        self.closed = False
        self._url = b""
        self._headers: list[bytes] = []
        self._body: list[bytes] = []
        self._size = 0

    # -- the client side -------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.proxy.fronts.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.proxy.fronts.discard(self)
        for upstream in list(self.upstreams.values()):
            upstream.transport.close()
        self.upstreams.clear()

    def pause_writing(self) -> None:
        for upstream in self.upstreams.values():
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        for upstream in self.upstreams.values():
            upstream.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(400, "BAD_REQUEST", "Protocol upgrades are not supported.")
        except httptools.HttpParserError as exc:
            self._refuse(400, "BAD_REQUEST", f"Malformed HTTP request: {exc}")

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer at once and close: what follows on this connection cannot be trusted."""
        if self.current is None and not self.closed:
            self.transport.write(_error(status, code, message, close=True))  # type: ignore[union-attr]
        self.transport.close()  # type: ignore[union-attr]

    # httptools callbacks (one request being parsed)
    def on_message_begin(self) -> None:
        self._url, self._headers, self._body, self._size = b"", [], [], 0

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lower = name.lower()
        if lower not in _HOP_BY_HOP:
            self._headers += (name, b": ", value, b"\r\n")
        elif lower == b"expect" and value.lower() == b"100-continue":
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > MAX_BODY_BYTES:
            raise httptools.HttpParserCallbackError("body too large")
        self._body.append(body)

    def on_message_complete(self) -> None:
        parser = self.parser
        method = parser.get_method()
        body = b"".join(self._body)
        head = b"".join(
            (method, b" ", self._url, b" HTTP/1.1\r\n", *self._headers,
             b"content-length: %d\r\n" % len(body))
        )  # fmt: skip
        self.queue.append(_Request(head, body, method, parser.should_keep_alive(), self._url))
        if len(self.queue) > _MAX_QUEUED:
            self.transport.pause_reading()  # type: ignore[union-attr]
        if self.current is None:
            self._next()

    # -- routing -------------------------------------------------------------------------------

    def _next(self) -> None:
        if not self.queue or self.closed:
            self.current = None
            return
        if len(self.queue) == _MAX_QUEUED:
            self.transport.resume_reading()  # type: ignore[union-attr]
        request = self.current = self.queue.popleft()
        routes = self.proxy.routes
        routes.refresh()
        port = routes.port
        if port is None:
            self.answer(_error(503, "NO_MODEL_DEPLOYED",
                               "No model version is deployed behind this endpoint."))  # fmt: skip
            return
        if routes.candidate_port is not None and request.invocation:
            if routes.weight and random.random() < routes.weight:
                request.canary, port = True, routes.candidate_port
            elif routes.mirror and random.random() < routes.mirror:
                request.mirror = True
        self.send(request, port)

    def send(self, request: _Request, port: int) -> None:
        upstream = self.upstreams.get(port)
        if upstream is not None and upstream.idle:
            upstream.send(request)
        else:
            self.proxy.spawn(self._connect(request, port))

    async def _connect(self, request: _Request, port: int) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, upstream = await asyncio.wait_for(
                loop.create_connection(lambda: Upstream(self, port), UPSTREAM_HOST, port),
                _CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            routes = self.proxy.routes
            if request.canary and routes.port is not None:
                request.canary = False  # a dead candidate gets nothing: the live one answers
                self.send(request, routes.port)
                return
            log.warning("upstream 127.0.0.1:%s unavailable: %s", port, exc)
            version = (routes.record or {}).get("version")
            message = f"The model server for version {version} is not answering."
            self.answer(_error(502, "UPSTREAM_UNAVAILABLE", message))
            return
        if self.closed:
            upstream.transport.close()
            return
        old = self.upstreams.get(port)
        if old is None or not old.idle:
            self.upstreams[port] = upstream
        upstream.send(request)

    def answer(self, response: bytes) -> None:
        """The proxy's own answer to the current request."""
        if not self.closed:
            self.transport.write(response)  # type: ignore[union-attr]
        self.done(self.current, 0, None)  # type: ignore[arg-type]

    def done(self, request: _Request, status: int, live: bytes | None) -> None:
        """The current request is answered (``live``: the answer's body, when mirrored)."""
        if request.mirror and status == 200 and live is not None:
            self.proxy.mirror.submit(request.head, request.body, live)
        if not request.keep_alive:
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]
            return
        self._next()

    def lost(self, request: _Request, port: int, relayed: bool) -> None:
        """The upstream connection of the current request closed before its answer ended."""
        if not relayed and not request.retried and not self.closed:
            request.retried = True  # e.g. a kept-alive connection the server had just closed
            self.proxy.spawn(self._connect(request, port))
        else:  # part of an answer went out: this connection cannot go on
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]


class Upstream(asyncio.Protocol):
    """A kept-alive connection from one client connection to one model server."""

    def __init__(self, front: Front, port: int) -> None:
        self.front, self.port = front, port
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser: httptools.HttpResponseParser | None = None
        self.request: _Request | None = None
        self.body: list[bytes] | None = None
        self.relayed = False
        self.open = True
        self.chunks: list[bytes] = []

    @property
    def idle(self) -> bool:
        return self.request is None and self.open and not self.transport.is_closing()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: _Request) -> None:
        self.request, self.relayed = request, False
        self.chunks.clear()
        self.parser = httptools.HttpResponseParser(self)
        self.body = [] if request.mirror else None
        self.transport.write(request.head + b"\r\n" + request.body)

    def data_received(self, data: bytes) -> None:
        if self.request is None:  # nothing asked: the server is closing on us
            self.transport.close()
            return
        self.chunks.append(data)
        try:
            self.parser.feed_data(data)  # type: ignore[union-attr]
        except httptools.HttpParserError:
            self.transport.close()
            return
        if self.request is not None and len(self.chunks) > 16:
            self._relay()  # a long answer is passed on as it comes

    def _relay(self) -> None:
        """What came back so far, to the client in one write (most answers: one chunk)."""
        if self.chunks and not self.front.closed:
            self.front.transport.write(b"".join(self.chunks))  # type: ignore[union-attr]
            self.relayed = True
        self.chunks.clear()

    def on_headers_complete(self) -> None:
        if self.request is not None and self.request.method == b"HEAD":
            self._complete()  # no body follows, whatever content-length says

    def on_body(self, body: bytes) -> None:
        if self.body is not None:
            self.body.append(body)

    def on_message_complete(self) -> None:
        if self.request is not None:
            self._complete()

    def _complete(self) -> None:
        request, parser = self.request, self.parser
        assert request is not None and parser is not None
        self.request = None
        self._relay()
        if not parser.should_keep_alive():
            self.open = False
            self.transport.close()
        live = b"".join(self.body) if self.body is not None else None
        self.front.done(request, parser.get_status_code(), live)

    def connection_lost(self, exc: Exception | None) -> None:
        self.open = False
        if self.front.upstreams.get(self.port) is self:
            del self.front.upstreams[self.port]
        request, self.request = self.request, None
        if request is not None:
            self.front.lost(request, self.port, self.relayed)


class Proxy:
    """The proxy server; :func:`run_proxy` is the blocking entry point."""

    def __init__(self, settings: DeploySettings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.local_state_dir)
        self.routes = Routes(self.state_dir / ACTIVE_FILE)
        self.mirror = Mirror(lambda: self.routes.candidate_port, self.spawn)
        self.fronts: set[Front] = set()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Front(self), self.settings.local_host, self.settings.local_port
        )
        self.routes.refresh()  # log the initial upstream
        log.info("proxy listening on %s:%s, routes from %s", self.settings.local_host,
                 self.settings.local_port, self.routes.path)  # fmt: skip

    async def close(self, grace_s: float = _SHUTDOWN_GRACE_S) -> None:
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(f.current or f.queue for f in self.fronts):
            await asyncio.sleep(0.05)
        for front in list(self.fronts):
            front.transport.close()  # type: ignore[union-attr]
        self.mirror.reset(None)
        if self._server is not None:
            await self._server.wait_closed()


def _write_pidfile(path: Path) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _remove_own_pidfile(path: Path) -> None:
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()


async def _serve(settings: DeploySettings) -> None:
    proxy = Proxy(settings)
    await proxy.start()
    supervisor = Supervisor(proxy.state_dir)
    pidfile = proxy.state_dir / PROXY_PIDFILE
    _write_pidfile(pidfile)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    supervising = asyncio.create_task(supervisor.run(stop))
    try:
        await stop.wait()
        log.info("stop signal received, shutting down")
        await supervising
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await proxy.close()
        _remove_own_pidfile(pidfile)
        log.info("proxy stopped")


def run_proxy(settings: DeploySettings) -> None:
    """Run the proxy until SIGTERM/SIGINT (blocking). Writes ``<state>/proxy.pid``."""
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(_serve(settings))
