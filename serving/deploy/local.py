"""The ``local`` deploy target: blue/green model-server processes behind a stable local port.

Layout of ``DeploySettings.local_state_dir``::

    proxy.pid / proxy.log     the front proxy (serving.proxy), one per state dir
    slot-<port>.pid / .log    a model server (`python -m serving.server`) on a slot port
    active.json               what the proxy serves: {version, model_uri, port, pid, deployed_at}
    deploy.lock               serialises deploys (nightly run vs. a manual deploy_model)

A deploy starts the new version on the slot that is not active, waits until it answers
``/ping`` and a real ``/invocations`` call with the model's input example, then atomically
replaces ``active.json`` (the proxy routes new connections there from then on) and stops the
old slot after a short drain. If the new server never gets healthy it is killed and the
active slot is left untouched, so a failed deploy never takes the endpoint down.

Every process is started in its own session (``start_new_session=True``), so it outlives the
Airflow task that started it and is stopped as a whole process group.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from serving.deploy.proxy import ACTIVE_FILE, PROXY_LOG, PROXY_PIDFILE, UPSTREAM_HOST
from serving.deploy.settings import DeploySettings

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
_LOCK_FILE = "deploy.lock"
_LOG_TAIL_LINES = 30
_PROXY_START_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 10.0
# Children we started from this process: kept referenced so they are reaped (no zombies, no
# "subprocess still running" warnings) and so liveness checks can use poll().
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


class DeployError(RuntimeError):
    """A local deploy failed; the previously active version (if any) is still serving."""


class LocalTarget:
    """Deploy a registered model version as a local process behind the front proxy."""

    def __init__(
        self, settings: DeploySettings, tracking_uri: str, *, drain_s: float = 2.0
    ) -> None:
        self.settings = settings
        self.tracking_uri = tracking_uri
        self.drain_s = drain_s
        self.state_dir = Path(settings.local_state_dir)

    # -- public API ------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The stable URL clients use (the proxy), whatever version is behind it."""
        return f"http://{self._front_host}:{self.settings.local_port}"

    def deploy(
        self,
        model_uri: str,
        version: str,
        *,
        input_example: pd.DataFrame | None = None,
    ) -> dict[str, Any]:
        """Roll ``model_uri`` out; returns a JSON-able summary.

        ``input_example`` is the smoke-test payload; by default the model's own logged input
        example (if it has none, readiness is judged by ``/ping`` alone).
        Raises :class:`DeployError` if the new server does not become healthy within
        ``settings.health_timeout_s``; the active version keeps serving in that case.
        """
        version = str(version)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with self._deploy_lock():
            self._ensure_proxy()
            active = self.read_active()
            previous_version = active.get("version") if active else None
            if (
                active
                and active.get("model_uri") == model_uri
                and str(active.get("version")) == version
                and _ping(active["port"])
            ):
                log.info("version %s (%s) is already live: nothing to do", version, model_uri)
                return {
                    "endpoint": self.endpoint,
                    "version": version,
                    "model_uri": model_uri,
                    "port": active["port"],
                    "pid": active.get("pid"),
                    "previous_version": previous_version,
                    "unchanged": True,
                }

            payload = self._smoke_payload(model_uri, input_example)
            port = self._pick_slot(active)
            self._stop_slot(port)  # whatever a previous (failed or killed) deploy left there
            if _accepting(UPSTREAM_HOST, port):
                raise DeployError(
                    f"slot port {port} is in use by a process this target did not start; "
                    "free it or change PIPELINE_DEPLOY_LOCAL_SLOT_PORTS"
                )

            started = time.monotonic()
            proc = self._start_slot(model_uri, port)
            try:
                self._wait_ready(proc, port, payload)
            except DeployError as exc:
                _stop_group(proc.pid)
                _unlink(self._slot_pidfile(port))
                tail = _tail(self._slot_log(port))
                raise DeployError(
                    f"version {version} ({model_uri}) did not become healthy on port {port}: "
                    f"{exc}; the active version ({previous_version or 'none'}) is unchanged.\n"
                    f"--- last lines of {self._slot_log(port)} ---\n{tail}"
                ) from None
            ready_s = round(time.monotonic() - started, 2)

            record = {
                "version": version,
                "model_uri": model_uri,
                "port": port,
                "pid": proc.pid,
                "deployed_at": datetime.now(UTC).isoformat(timespec="seconds"),
            }
            _atomic_write_json(self.state_dir / ACTIVE_FILE, record)
            log.info(
                "version %s live on %s (slot port %s, ready in %.1fs); previous: %s",
                version,
                self.endpoint,
                port,
                ready_s,
                previous_version,
            )
            if active and active.get("port") != port:
                # Connections opened before the switch finish on the old server.
                time.sleep(self.drain_s)
                self._stop_slot(int(active["port"]))
            return {
                "endpoint": self.endpoint,
                **record,
                "previous_version": previous_version,
                "ready_s": ready_s,
                "unchanged": False,
            }

    def status(self) -> dict[str, Any] | None:
        """``active.json`` plus whether it answers; ``None`` if nothing was deployed."""
        active = self.read_active()
        if active is None:
            return None
        return {
            **active,
            "endpoint": self.endpoint,
            "healthy": _ping(int(active["port"])),
            "proxy_running": self._proxy_pid() is not None
            and _accepting(self._front_host, self.settings.local_port),
        }

    def active_version(self) -> str | None:
        active = self.read_active()
        return str(active["version"]) if active and "version" in active else None

    def stop_all(self) -> dict[str, Any]:
        """Stop the proxy and every slot server (by pidfile) and forget what was active."""
        stopped: dict[str, Any] = {}
        pid = self._proxy_pid()
        if pid is not None:
            _stop_group(pid)
            stopped["proxy"] = pid
        _unlink(self.state_dir / PROXY_PIDFILE)
        ports = set(self.settings.local_slot_ports)
        active = self.read_active()
        if active:
            ports.add(int(active["port"]))
        for port in sorted(ports):
            slot_pid = self._stop_slot(port)
            if slot_pid is not None:
                stopped[f"slot-{port}"] = slot_pid
        _unlink(self.state_dir / ACTIVE_FILE)
        return stopped

    def read_active(self) -> dict[str, Any] | None:
        try:
            return json.loads((self.state_dir / ACTIVE_FILE).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("unreadable %s: %s", self.state_dir / ACTIVE_FILE, exc)
            return None

    # -- the front proxy ----------------------------------------------------------------------

    @property
    def _front_host(self) -> str:
        host = self.settings.local_host
        return UPSTREAM_HOST if host in ("", "0.0.0.0", "::") else host

    def _proxy_pid(self) -> int | None:
        return _live_pid(self.state_dir / PROXY_PIDFILE, "serving.deploy", "proxy")

    def _ensure_proxy(self) -> None:
        host, port = self._front_host, self.settings.local_port
        pid = self._proxy_pid()
        if pid is not None:
            if _wait_for(lambda: _accepting(host, port), 5.0):
                return
            log.warning("proxy pid %s is not accepting on %s:%s; restarting it", pid, host, port)
            _stop_group(pid)
        logfile = self.state_dir / PROXY_LOG
        with open(logfile, "ab") as out:
            proc = _spawn(
                [sys.executable, "-m", "serving.deploy", "proxy"],
                env=self._child_env(),
                stdout=out,
            )
        log.info("started proxy pid %s on %s:%s (log: %s)", proc.pid, host, port, logfile)

        def up() -> bool:
            if proc.poll() is not None:
                raise DeployError(
                    f"the proxy exited with code {proc.returncode} (is {host}:{port} taken?)\n"
                    f"--- last lines of {logfile} ---\n{_tail(logfile)}"
                )
            return _accepting(host, port)

        if not _wait_for(up, _PROXY_START_TIMEOUT_S):
            _stop_group(proc.pid)
            raise DeployError(
                f"the proxy did not listen on {host}:{port} within {_PROXY_START_TIMEOUT_S:.0f}s"
                f"\n--- last lines of {logfile} ---\n{_tail(logfile)}"
            )

    # -- slots ------------------------------------------------------------------------------

    def _slot_pidfile(self, port: int) -> Path:
        return self.state_dir / f"slot-{port}.pid"

    def _slot_log(self, port: int) -> Path:
        return self.state_dir / f"slot-{port}.log"

    def _pick_slot(self, active: dict[str, Any] | None) -> int:
        slots = list(self.settings.local_slot_ports)
        if active and int(active.get("port", -1)) in slots:
            return next(p for p in slots if p != int(active["port"]))
        return slots[0]

    def _stop_slot(self, port: int) -> int | None:
        pid = _live_pid(self._slot_pidfile(port), "serving.server")
        if pid is not None:
            log.info("stopping model server pid %s on slot port %s", pid, port)
            _stop_group(pid)
        _unlink(self._slot_pidfile(port))
        return pid

    def _start_slot(self, model_uri: str, port: int) -> subprocess.Popen[bytes]:
        cmd = [
            sys.executable, "-m", "serving.server",
            "--model-uri", model_uri,
            "--host", UPSTREAM_HOST,
            "--port", str(port),
            "--workers", "1",
        ]  # fmt: skip
        env = self._child_env()
        env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        logfile = self._slot_log(port)
        with open(logfile, "wb") as out:
            out.write(f"# {datetime.now(UTC).isoformat()} {' '.join(cmd)}\n".encode())
            out.flush()
            proc = _spawn(cmd, env=env, stdout=out)
        _atomic_write_text(self._slot_pidfile(port), f"{proc.pid}\n")
        log.info("starting model server pid %s for %s on slot port %s", proc.pid, model_uri, port)
        return proc

    def _wait_ready(self, proc: subprocess.Popen[bytes], port: int, payload: str | None) -> None:
        deadline = time.monotonic() + self.settings.health_timeout_s
        base = f"http://{UPSTREAM_HOST}:{port}"
        with httpx.Client(timeout=10.0) as client:
            while True:
                if proc.poll() is not None:
                    raise DeployError(f"the server exited with code {proc.returncode}")
                if time.monotonic() > deadline:
                    raise DeployError(
                        f"no healthy /ping within {self.settings.health_timeout_s:.0f}s"
                    )
                try:
                    if client.get(f"{base}/ping", timeout=2.0).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.25)
            if payload is None:
                return
            try:
                resp = client.post(
                    f"{base}/invocations",
                    content=payload,
                    headers={"Content-Type": "application/json"},
                    timeout=max(5.0, deadline - time.monotonic()),
                )
            except httpx.HTTPError as exc:
                raise DeployError(f"smoke request failed: {exc!r}") from None
            if resp.status_code != 200:
                raise DeployError(
                    f"smoke request with the input example returned {resp.status_code}: "
                    f"{resp.text[:500]}"
                )

    def _smoke_payload(self, model_uri: str, input_example: Any) -> str | None:
        from mlflow.models import convert_input_example_to_serving_input

        if input_example is None:
            input_example = self._load_input_example(model_uri)
        if input_example is None:
            log.warning("%s has no input example: readiness is judged by /ping only", model_uri)
            return None
        return convert_input_example_to_serving_input(input_example)

    def _load_input_example(self, model_uri: str) -> Any:
        """The model's logged input example, read with an explicit tracking/registry URI."""
        import tempfile

        from mlflow.artifacts import download_artifacts
        from mlflow.models import Model

        from ml.registry import use_mlflow

        use_mlflow(self.tracking_uri)  # models:/ resolution ignores registry_uri= below
        uris = {"tracking_uri": self.tracking_uri, "registry_uri": self.tracking_uri}
        base = model_uri.rstrip("/")
        try:
            with tempfile.TemporaryDirectory(prefix="model-meta-") as tmp:
                model = Model.load(
                    download_artifacts(artifact_uri=f"{base}/MLmodel", dst_path=tmp, **uris)
                )
                info = model.saved_input_example_info
                if not info:
                    return None
                download_artifacts(
                    artifact_uri=f"{base}/{info['artifact_path']}", dst_path=tmp, **uris
                )
                return model.load_input_example(tmp)
        except Exception as exc:
            raise DeployError(f"cannot read model metadata of {model_uri}: {exc}") from exc

    # -- helpers ------------------------------------------------------------------------------

    def _child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Model servers and MLflow helpers look for tools (uvicorn) on PATH: this interpreter's.
        env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
        )
        env["PYTHONUNBUFFERED"] = "1"
        # The proxy child reads DeploySettings from the environment: hand it ours.
        s = self.settings
        env["PIPELINE_DEPLOY_LOCAL_HOST"] = s.local_host
        env["PIPELINE_DEPLOY_LOCAL_PORT"] = str(s.local_port)
        env["PIPELINE_DEPLOY_LOCAL_SLOT_PORTS"] = ",".join(map(str, s.local_slot_ports))
        env["PIPELINE_DEPLOY_LOCAL_STATE_DIR"] = str(self.state_dir)
        return env

    @contextlib.contextmanager
    def _deploy_lock(self) -> Iterator[None]:
        wait_s = self.settings.health_timeout_s + 60
        with open(self.state_dir / _LOCK_FILE, "a+") as fh:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() > deadline:
                        raise DeployError(
                            f"another deploy holds {fh.name} for more than {wait_s:.0f}s"
                        ) from None
                    time.sleep(0.5)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)


# -- process and file helpers (module level: no state) -------------------------------------------


def _spawn(cmd: list[str], *, env: dict[str, str], stdout: Any) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        cmd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # own session + process group: survives us, stopped as a group
        close_fds=True,
    )
    _CHILDREN[proc.pid] = proc
    return proc


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        if child.poll() is None:
            return True
        _CHILDREN.pop(pid, None)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return _proc_state(pid) not in ("Z", "X")


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], pgrp is [2])."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rfind(")") + 2 :].split()


def _proc_state(pid: int) -> str | None:
    fields = _proc_stat(pid)
    return fields[0] if fields else None


def _cmdline(pid: int) -> list[str] | None:
    """The process's argv, or None where there is no /proc (macOS: trust the pidfile)."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return raw.decode(errors="replace").rstrip("\0").split("\0")


def _live_pid(pidfile: Path, *markers: str) -> int | None:
    """The pid in ``pidfile`` if that process is alive and still looks like ours.

    The marker check guards against pid reuse: a stale pidfile must never make us signal an
    unrelated process that happens to have the same pid now. Markers are whole arguments
    (``serve`` must not match the proxy's ``serving``).
    """
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    if pid <= 1 or not _alive(pid):
        return None
    cmdline = _cmdline(pid)
    if cmdline is not None and not all(m in cmdline for m in markers):  # argv elements
        log.warning(
            "%s names pid %s, which is not ours (%s); ignoring it", pidfile, pid, " ".join(cmdline)
        )
        return None
    return pid


def _group_alive(pgid: int) -> bool:
    """Whether any non-zombie process is left in the process group."""
    if not Path("/proc/self/stat").exists():
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _proc_stat(int(entry.name))
        if fields and len(fields) > 2 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _stop_group(pid: int, timeout_s: float = _STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group led by ``pid`` (or just ``pid``), wait, then SIGKILL."""
    try:
        pgid = os.getpgid(pid)
    except ProcessLookupError:
        _CHILDREN.pop(pid, None)
        return
    # Only signal a whole group we lead (we started it with start_new_session=True).
    group = pgid == pid

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(pgid, sig)
            else:
                os.kill(pid, sig)

    def gone() -> bool:
        child = _CHILDREN.get(pid)
        if child is not None:
            child.poll()  # reap our own child so it does not linger as a zombie
        return not (_group_alive(pgid) if group else _alive(pid))

    send(signal.SIGTERM)
    if not _wait_for(gone, timeout_s):
        log.warning("pid %s did not stop on SIGTERM within %.0fs: SIGKILL", pid, timeout_s)
        send(signal.SIGKILL)
        _wait_for(gone, 5.0)
    child = _CHILDREN.pop(pid, None)
    if child is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)


def _wait_for(predicate: Any, timeout_s: float, interval_s: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout_s
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval_s)


def _accepting(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _ping(port: int) -> bool:
    try:
        return httpx.get(f"http://{UPSTREAM_HOST}:{port}/ping", timeout=2.0).status_code == 200
    except httpx.HTTPError:
        return False


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _atomic_write_json(path: Path, record: dict[str, Any]) -> None:
    _atomic_write_text(path, json.dumps(record, indent=2) + "\n")


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
