"""The stack's services by name: found among the processes of its state folder, started once
(output in ``logs/<service>.log``), stopped, and waited for until they answer over HTTP."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil

from scripts.stacklib import processes as procs
from scripts.stacklib.processes import say
from serving.deploy.local import wait_for as wait_until  # (tenacity)


class Services:
    """The services of the stack of ``state``: ``logs`` holds their output, ``pids`` the pid
    files an older stack.py wrote (`down` stops those processes too)."""

    def __init__(self, state: Path, logs: Path, pids: Path) -> None:
        self.state, self.logs, self.pids = state, logs, pids

    def processes(self) -> dict[psutil.Process, str]:
        """``{process: service}`` of the stack; also the services an older stack.py recorded in
        pid files (each in its own session), if those are still there and of this state dir."""
        groups = {}
        for pidfile in self.pids.glob("*.pid"):
            with contextlib.suppress(OSError, ValueError, psutil.Error):
                proc = psutil.Process(int(pidfile.read_text()))
                if any(
                    str(self.state) in word for word in [*proc.cmdline(), *proc.environ().values()]
                ):
                    groups[proc.pid] = pidfile.stem
        serving = Path(os.environ.get("PIPELINE_DEPLOY_LOCAL_STATE_DIR") or self.state / "serving")
        return procs.stack_processes(self.state, serving, groups)

    def of(self, service: str) -> list[psutil.Process]:
        """The processes of ``service``, the one the stack started (its parent is not) first."""
        found = [p for p, name in self.processes().items() if name == service]
        pids = {p.pid for p in found}
        return sorted(found, key=lambda p: (p.info["ppid"] in pids, p.pid))

    def start(
        self, service: str, argv: list[str], env: dict | None = None, **popen: Any
    ) -> Callable[[], bool]:
        """Start ``service`` unless it runs as ``argv`` (what is left of a crashed one, or one
        started otherwise, is stopped first); returns a function that says whether it runs."""
        running, mark = self.of(service), {procs.MARKER: str(self.state), procs.SERVICE: service}
        mark[procs.ARGV] = json.dumps(argv)  # its own title may hide it (setproctitle, netns exec)
        if running and (running[0].info["environ"] or {}).get(procs.ARGV) == mark[procs.ARGV]:
            say(f"{service} already running")
            return running[0].is_running
        self.stop(service)
        env = {**(os.environ if env is None else env), **mark}
        proc = procs.spawn(argv, env, self.logs / f"{service}.log", **popen)
        say(f"started {service} (pid {proc.pid}, log {self.logs / f'{service}.log'})")
        return lambda: proc.poll() is None

    def stop(self, service: str) -> None:
        found = self.of(service)
        if found:
            procs.terminate(found)
            say(f"stopped {service} ({len(found)} processes)")


def wait_http(url: str, what: str, timeout_s: float, alive, logs: Path, each=lambda: None) -> None:
    """Wait until ``url`` answers 200 (``each`` runs before every try); SystemExit, pointing
    at ``logs``, when ``alive()`` says the service exited or ``timeout_s`` passed."""

    def answered() -> bool:
        each()
        if not alive():
            raise SystemExit(f"{what} exited during start-up; see {logs}")
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(url, timeout=2).status_code == 200
        return False

    if not wait_until(answered, timeout_s, 1.0):
        raise SystemExit(f"{what} did not answer {url} in {timeout_s:.0f}s; see {logs}")


def stale_since_install(leader: psutil.Process | None, stamp: Path) -> bool:
    """Whether ``leader`` started before the venv was last installed (``stamp``): Airflow's
    scheduler imports MLflow before it forks the task processes (scripts/airflow_settings),
    which would then run the old MLflow from memory against the new files. `up` restarts it."""
    try:
        return leader is not None and stamp.stat().st_mtime > leader.create_time()
    except (OSError, psutil.Error):
        return False
