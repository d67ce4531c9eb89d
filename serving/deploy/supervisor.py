"""The local target's kubelet: the active model server is started again when it dies.

:class:`Supervisor` runs inside the front proxy (:mod:`serving.deploy.proxy`) and checks the
active model server every second; when it has died (``kill -9``, a crash, a reboot of the
stack) it starts it again with the command recorded in ``active.json``, on the same port, with
exponential backoff between restarts of a server that keeps dying (1 s, 2 s, ... 60 s, like
CrashLoopBackOff). A deploy in progress (``deploy.lock`` held) is never interfered with. A
canary beside it is not restarted: a candidate that dies during its steps is a verdict, not
something to heal.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from tenacity import Retrying, retry_if_result, stop_after_delay, wait_fixed

log = logging.getLogger("serving.proxy")

# The files of the local target's state dir that the proxy and the target share.
ACTIVE_FILE = "active.json"
PROXY_PIDFILE = "proxy.pid"
PROXY_LOG = "proxy.log"
# Held by whoever starts or stops model servers (a deploy, the supervisor's restarts).
DEPLOY_LOCK = "deploy.lock"
UPSTREAM_HOST = "127.0.0.1"
# How often the supervisor looks, and the restart backoff of a server that keeps dying.
SUPERVISE_EVERY_S = 1.0
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0)
# A restarted server that stays up this long resets the backoff.
STABLE_AFTER_S = 60.0
_LOG_TAIL_LINES = 30
_STOP_TIMEOUT_S = 10.0
# Children we started from this process: kept referenced so they are reaped (no zombies, no
# "subprocess still running" warnings) and so liveness checks can use poll().
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


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


# -- process and file helpers of the local target (no state) ---------------------------------


def _try_flock(fh: Any) -> bool:
    """Take the exclusive lock on an open file if it is free (never blocks)."""
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def spawn(cmd: list[str], *, env: dict[str, str], stdout: Any) -> subprocess.Popen[bytes]:
    """:func:`start_detached`, kept referenced so it is reaped and ``poll()`` works."""
    proc = start_detached(cmd, env=env, stdout=stdout)
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
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def process_is(pid: int | None, *markers: str) -> bool:
    """``pid`` is alive and its argv holds every marker as a whole argument (pid-reuse guard)."""
    if not pid or pid <= 1 or not _alive(pid):
        return False
    try:
        argv = psutil.Process(pid).cmdline()
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True  # someone else's process: trust the pidfile
    return all(m in argv for m in markers)


def _live_pid(pidfile: Path, *markers: str) -> int | None:
    """The pid in ``pidfile`` if that process is alive and still looks like ours.

    The marker check guards against pid reuse: a stale pidfile must never make us signal an
    unrelated process that happens to have the same pid now. Markers are whole arguments
    (``serve`` must not match ``serving``).
    """
    try:
        pid = int(pidfile.read_text().strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    if not process_is(pid, *markers):
        log.warning("%s names pid %s, which is not ours; ignoring it", pidfile, pid)
        return None
    return pid


def stop_group(pid: int, timeout_s: float = _STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group led by ``pid`` (or just ``pid``), wait, then SIGKILL."""
    try:
        leader = psutil.Process(pid)
        group = os.getpgid(pid) == pid  # only signal a whole group we lead
        members = [leader, *leader.children(recursive=True)]
    except (psutil.NoSuchProcess, ProcessLookupError):
        _reap(pid)
        return

    def send(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if group:
                os.killpg(pid, sig)
            else:
                os.kill(pid, sig)

    send(signal.SIGTERM)
    _reap(pid, wait=False)
    _, alive = psutil.wait_procs(members, timeout=timeout_s)
    if alive:
        log.warning("pid %s did not stop on SIGTERM within %.0fs: SIGKILL", pid, timeout_s)
        send(signal.SIGKILL)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=5.0)
    _reap(pid)


def _reap(pid: int, *, wait: bool = True) -> None:
    """Collect our own child's exit status, so it does not linger as a zombie."""
    child = _CHILDREN.get(pid)
    if child is None:
        return
    if wait:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=1.0)
        _CHILDREN.pop(pid, None)
    else:
        child.poll()


def wait_for(predicate: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true (True) or ``timeout_s`` passed (False)."""
    retrying = Retrying(
        stop=stop_after_delay(timeout_s),
        wait=wait_fixed(interval_s),
        retry=retry_if_result(lambda ok: not ok),
        retry_error_callback=lambda state: False,
    )
    return retrying(lambda: bool(predicate()))


def _accepting(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def _tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _unlink(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
