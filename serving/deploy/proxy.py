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

The proxy is also the local target's kubelet: :class:`Supervisor` checks the active model
server every second and, when it has died (``kill -9``, a crash, a reboot of the stack), starts
it again with the command recorded in ``active.json``, on the same port, with exponential
backoff between restarts of a server that keeps dying (1 s, 2 s, ... 60 s, like
CrashLoopBackOff). A deploy in progress (``deploy.lock`` held) is never interfered with.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

from serving.deploy.settings import DeploySettings

log = logging.getLogger("serving.proxy")

ACTIVE_FILE = "active.json"
PROXY_PIDFILE = "proxy.pid"
PROXY_LOG = "proxy.log"
# Held by whoever starts or stops model servers (a deploy, the supervisor's restarts).
DEPLOY_LOCK = "deploy.lock"
UPSTREAM_HOST = "127.0.0.1"

_CHUNK = 64 * 1024
_CONNECT_TIMEOUT_S = 5.0
# How long an error reply waits for the request it answers (so the client sees the reply,
# not a reset caused by closing a socket with unread data).
_REQUEST_READ_TIMEOUT_S = 2.0
_MAX_DRAINED_BODY = 1 << 20
# On SIGTERM: stop accepting, give open connections this long to finish, then cut them.
_SHUTDOWN_GRACE_S = 5.0
# The supervisor: how often it looks, and the restart backoff of a server that keeps dying.
SUPERVISE_EVERY_S = 1.0
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)
# A restarted server that stays up this long resets the backoff.
STABLE_AFTER_S = 60.0


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


class Supervisor:
    """Start the active model server again when it dies (see the module docstring)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.active_path = state_dir / ACTIVE_FILE
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._failures = 0
        self._next_try = 0.0
        self._started_at = 0.0

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self.check()
            except Exception:  # the proxy must keep proxying whatever happens here
                log.exception("supervisor check failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SUPERVISE_EVERY_S)

    def check(self) -> None:
        for pid, child in list(self._children.items()):
            if child.poll() is not None:  # reap our own children
                del self._children[pid]
        try:
            active = json.loads(self.active_path.read_text())
        except (OSError, ValueError):
            return
        cmd, pid = active.get("cmd"), active.get("pid")
        if not cmd or _is_server(pid, active):
            if pid and self._failures and time.monotonic() - self._started_at > STABLE_AFTER_S:
                self._failures = 0
            return
        now = time.monotonic()
        if now < self._next_try:
            return
        with open(self.state_dir / DEPLOY_LOCK, "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return  # a deploy is changing processes right now: not ours to touch
            try:
                self._restart(active)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _restart(self, active: dict[str, Any]) -> None:
        # Re-read under the lock: a deploy may have switched versions since.
        try:
            active = json.loads(self.active_path.read_text())
        except (OSError, ValueError):
            return
        if _is_server(active.get("pid"), active):
            return
        env = dict(os.environ)
        if active.get("tracking_uri"):
            env["MLFLOW_TRACKING_URI"] = active["tracking_uri"]
        logfile = self.state_dir / f"slot-{active['port']}.log"
        with open(logfile, "ab") as out:
            stamp = datetime.now(UTC).isoformat()
            out.write(f"# {stamp} restart: {' '.join(active['cmd'])}\n".encode())
            out.flush()
            proc = start_detached(active["cmd"], env=env, stdout=out)
        self._children[proc.pid] = proc
        delay = RESTART_BACKOFF_S[min(self._failures, len(RESTART_BACKOFF_S) - 1)]
        self._failures += 1
        self._started_at = time.monotonic()
        self._next_try = self._started_at + delay
        record = {
            **active,
            "pid": proc.pid,
            "restarts": int(active.get("restarts") or 0) + 1,
            "restarted_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        atomic_write_json(self.active_path, record)
        (self.state_dir / f"slot-{active['port']}.pid").write_text(f"{proc.pid}\n")
        log.warning(
            "model server of version %s (port %s, pid %s) was not running: started it again as "
            "pid %s (restart %d; next restart no sooner than %.0fs)",
            active.get("version"),
            active.get("port"),
            active.get("pid"),
            proc.pid,
            record["restarts"],
            delay,
        )


def start_detached(cmd: list[str], *, env: dict[str, str], stdout: Any) -> subprocess.Popen[bytes]:
    """Start ``cmd`` in its own session: it outlives its starter and stops as a group."""
    return subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        close_fds=True,
    )


def atomic_write_json(path: Path, record: dict[str, Any]) -> None:
    """Replace ``path`` in one step: a reader sees the old record or the new one, never half."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(json.dumps(record, indent=2) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _is_server(pid: Any, active: dict[str, Any]) -> bool:
    """``pid`` is a live model server on the active port (not a zombie, not a reused pid)."""
    try:
        proc = psutil.Process(int(pid))
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        argv = proc.cmdline()
    except (psutil.NoSuchProcess, TypeError, ValueError):
        return False
    except psutil.AccessDenied:
        return True
    return "serving.server" in argv and str(active.get("port")) in argv


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
    asyncio.run(_serve(settings))
