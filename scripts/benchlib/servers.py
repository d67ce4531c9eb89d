"""The benchmarked servers' processes: a free port, their environment, start, ready, stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")])  # stock runs `uvicorn` from PATH
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["MLFLOW_TRACKING_URI"] = tracking_uri
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env["PYTHONUNBUFFERED"] = "1"
    return env


def stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)


def wait_ready(proc: subprocess.Popen, url: str, log_path: Path, timeout_s: float = 240) -> float:
    import httpx

    started = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(
                f"server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}"
            )
        try:
            if httpx.get(f"{url}/ping", timeout=2).status_code == 200:
                return time.monotonic() - started
        except httpx.HTTPError:
            pass
        if time.monotonic() - started > timeout_s:
            raise RuntimeError(f"server not ready in {timeout_s}s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.25)


@dataclass
class Server:
    label: str
    proc: subprocess.Popen
    url: str
    log_path: Path


def start_server(
    label: str,
    cmd: list[str],
    port: int,
    models: dict[str, Any],
    workdir: Path,
    pythonpath: str | None = None,
) -> Server:
    log_path = workdir / f"{label}.log"
    print(f"== start {label}: {' '.join(cmd)}", flush=True)
    env = child_env(models["tracking_uri"])
    if pythonpath:  # imported before the repository's own packages
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, env["PYTHONPATH"]])
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=str(workdir),
        )
    return Server(label, proc, f"http://127.0.0.1:{port}", log_path)
