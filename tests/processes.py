"""Helpers for tests that start real server processes (MLflow, Airflow's API server)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx


def log_tail(path: Path, chars: int = 4000) -> str:
    """The end of a process's log, or "" before the process wrote one."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


def wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    """Until ``url`` answers 200; raises with the end of ``log`` if ``proc`` exits first or
    the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not come up:\n{log_tail(log)}")
