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
import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil

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
