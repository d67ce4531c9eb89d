"""The local stand-in for a Kubernetes Service: a stable front port in front of a model server.

An asyncio TCP proxy listens on ``DeploySettings.local_host:local_port`` and forwards each
*new* connection to the upstream port named in ``<local_state_dir>/active.json``. The deployer
(:mod:`serving.local`) replaces that file atomically once a new model server is healthy, so a
switch is zero-downtime for new connections while connections already open finish on the old
upstream (the deployer stops the old server only after a short drain).

The proxy works on bytes, not HTTP: it never parses or rewrites requests, with one exception —
when nothing is deployed (or the upstream refuses), it answers a minimal HTTP error itself
(``503 NO_MODEL_DEPLOYED`` / ``502 UPSTREAM_UNAVAILABLE``) so clients get a readable reason.

Upstreams are always ``127.0.0.1``: ``active.json`` names a port, never a host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

from serving.deploy.settings import DeploySettings

log = logging.getLogger("serving.proxy")

ACTIVE_FILE = "active.json"
PROXY_PIDFILE = "proxy.pid"
PROXY_LOG = "proxy.log"
UPSTREAM_HOST = "127.0.0.1"

_CHUNK = 64 * 1024
_CONNECT_TIMEOUT_S = 5.0
# How long an error reply waits for the request it answers (so the client sees the reply,
# not a reset caused by closing a socket with unread data).
_REQUEST_READ_TIMEOUT_S = 2.0
_MAX_DRAINED_BODY = 1 << 20
# On SIGTERM: stop accepting, give open connections this long to finish, then cut them.
_SHUTDOWN_GRACE_S = 5.0


class ActiveUpstream:
    """The current upstream, re-read from ``active.json`` whenever the file changes.

    Change detection uses (mtime_ns, inode, size): the deployer writes a temp file and
    ``os.replace``s it, so every switch produces a new inode even within one mtime tick.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._key: tuple[int, int, int] | None = None
        self.current: dict[str, Any] | None = None

    def get(self) -> dict[str, Any] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            if self.current is not None:
                log.info(
                    "switch: version %s (port %s) -> nothing deployed (%s removed)",
                    self.current.get("version"),
                    self.current.get("port"),
                    self.path.name,
                )
            self._key, self.current = None, None
            return None
        key = (st.st_mtime_ns, st.st_ino, st.st_size)
        if key == self._key:
            return self.current
        try:
            record = json.loads(self.path.read_text())
            port = int(record["port"])
            if not 0 < port < 65_536:
                raise ValueError(f"port out of range: {port}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            # Writes are atomic, so this is a hand edit gone wrong: keep serving what we had.
            log.warning(
                "ignoring unreadable %s (%s); keeping the previous upstream", self.path, exc
            )
            self._key = key
            return self.current
        self._key = key
        old = self.current
        self.current = {**record, "port": port}
        if old is None or old.get("port") != port or old.get("version") != record.get("version"):
            log.info(
                "switch: %s -> version %s (port %s, %s)",
                "nothing"
                if old is None
                else f"version {old.get('version')} (port {old.get('port')})",
                record.get("version"),
                port,
                record.get("model_uri"),
            )
        return self.current


class Proxy:
    """The proxy server; :func:`run_proxy` is the blocking entry point."""

    def __init__(self, settings: DeploySettings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.local_state_dir)
        self.active = ActiveUpstream(self.state_dir / ACTIVE_FILE)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._server = await asyncio.start_server(
            self._on_connect, self.settings.local_host, self.settings.local_port
        )
        self.active.get()  # log the initial upstream
        log.info(
            "proxy listening on %s:%s, upstream from %s",
            self.settings.local_host,
            self.settings.local_port,
            self.active.path,
        )

    async def close(self, grace_s: float = _SHUTDOWN_GRACE_S) -> None:
        if self._server is not None:
            self._server.close()
        if self._tasks:
            log.info("waiting up to %.0fs for %d open connection(s)", grace_s, len(self._tasks))
            _, pending = await asyncio.wait(set(self._tasks), timeout=grace_s)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._handle(reader, writer)
        except Exception:  # one bad connection must never take the proxy down
            log.exception("connection handler failed")
        finally:
            self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        active = self.active.get()
        if active is None:
            await _reply_error(
                reader,
                writer,
                503,
                "NO_MODEL_DEPLOYED",
                "No model version is deployed behind this endpoint.",
            )
            return
        port = active["port"]
        try:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(UPSTREAM_HOST, port), _CONNECT_TIMEOUT_S
            )
        except (OSError, TimeoutError) as exc:
            log.warning(
                "upstream 127.0.0.1:%s (version %s) unavailable: %s",
                port,
                active.get("version"),
                exc,
            )
            await _reply_error(
                reader,
                writer,
                502,
                "UPSTREAM_UNAVAILABLE",
                f"The model server for version {active.get('version')} is not answering.",
            )
            return
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            up_writer.close()
            with contextlib.suppress(Exception):
                await up_writer.wait_closed()


async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    """Copy bytes until EOF, then half-close ``dst`` so the other side sees the end too."""
    try:
        while data := await src.read(_CHUNK):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        # A reset on one side: close the other so its pipe ends as well.
        dst.close()


async def _reply_error(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    status: int,
    error_code: str,
    message: str,
) -> None:
    """Answer one HTTP request with a JSON error (MLflow's error shape) and close."""
    with contextlib.suppress(Exception):
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _REQUEST_READ_TIMEOUT_S)
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        if 0 < length <= _MAX_DRAINED_BODY:
            await asyncio.wait_for(reader.readexactly(length), _REQUEST_READ_TIMEOUT_S)
    body = json.dumps({"error_code": error_code, "message": message}).encode()
    reason = {502: "Bad Gateway", 503: "Service Unavailable"}.get(status, "Error")
    head_out = (
        f"HTTP/1.1 {status} {reason}\r\n"
        "Content-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode()
    with contextlib.suppress(ConnectionError, OSError):
        writer.write(head_out + body)
        await writer.drain()


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
    pidfile = proxy.state_dir / PROXY_PIDFILE
    _write_pidfile(pidfile)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        log.info("stop signal received, shutting down")
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await proxy.close()
        _remove_own_pidfile(pidfile)
        log.info("proxy stopped")


def run_proxy(settings: DeploySettings) -> None:
    """Run the proxy until SIGTERM/SIGINT (blocking). Writes ``<state>/proxy.pid``."""
    asyncio.run(_serve(settings))
