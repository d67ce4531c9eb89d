"""The local target's slots: model-server processes on ``DeploySettings.local_slot_ports``.

A slot server is ``python -m serving.server`` on one slot port, started in its own session
(it outlives the Airflow task that started it and is stopped as a whole process group), with
its pidfile and log in the state dir (``slot-<port>.pid`` / ``.log``). It is ready when it
answers ``/ping`` and a real ``/invocations`` call with the model's logged input example.
Which slot serves, and when traffic moves, is :class:`serving.deploy.local.LocalTarget`'s.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ml.settings import QualitySettings
from serving.deploy.settings import DeploySettings
from serving.deploy.supervisor import (
    UPSTREAM_HOST,
    _atomic_write_text,
    _live_pid,
    _unlink,
    spawn,
    stop_group,
    wait_for,
)
from serving.deploy.target import DeployFailed
from serving.deploy.verify import Endpoint, EndpointUnreachable

# The local target's logger: these records read as they did before the slots had a module.
log = logging.getLogger("serving.deploy.local")

PROJECT_ROOT = Path(__file__).resolve().parents[2]
# The argv marker of a slot's model server (pid-reuse guard, restarts).
SERVER_MODULE = "serving.server"


class DeployError(DeployFailed):
    """A local deploy failed; the previously active version (if any) is still serving."""


class Slots:
    """The slot servers of one state dir: their files, command, start, readiness and stop."""

    def __init__(self, settings: DeploySettings, state_dir: Path, tracking_uri: str) -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.tracking_uri = tracking_uri

    def pidfile(self, port: int) -> Path:
        return self.state_dir / f"slot-{port}.pid"

    def logfile(self, port: int) -> Path:
        return self.state_dir / f"slot-{port}.log"

    def pick(self, active: dict[str, Any] | None) -> int:
        """The slot the live server (``active``) does not use."""
        slots = list(self.settings.local_slot_ports)
        if active and int(active.get("port", -1)) in slots:
            return next(p for p in slots if p != int(active["port"]))
        return slots[0]

    def stop(self, port: int) -> int | None:
        pid = _live_pid(self.pidfile(port), SERVER_MODULE)
        if pid is not None:
            log.info("stopping model server pid %s on slot port %s", pid, port)
            stop_group(pid)
        _unlink(self.pidfile(port))
        return pid

    def command(self, model_uri: str, port: int) -> list[str]:
        payload_log = []
        if sample := self.settings.payload_log_sample_percent:
            payload_log = ["--payload-log-path", QualitySettings().payload_path,
                           "--payload-log-sample-percent", f"{sample:g}"]  # fmt: skip
        return [
            sys.executable, "-m", SERVER_MODULE,
            "--model-uri", model_uri,
            "--host", UPSTREAM_HOST,
            "--port", str(port),
            "--workers", "1",
            *payload_log,
        ]  # fmt: skip

    def start(
        self, model_uri: str, port: int, extra: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:
        cmd = [*self.command(model_uri, port), *extra]
        env = child_env(self.settings, self.state_dir)
        env["MLFLOW_TRACKING_URI"] = self.tracking_uri
        logfile = self.logfile(port)
        with open(logfile, "wb") as out:
            out.write(f"# {datetime.now(UTC).isoformat()} {' '.join(cmd)}\n".encode())
            out.flush()
            proc = spawn(cmd, env=env, stdout=out)
        _atomic_write_text(self.pidfile(port), f"{proc.pid}\n")
        log.info("starting model server pid %s for %s on slot port %s", proc.pid, model_uri, port)
        return proc

    def wait_ready(self, proc: subprocess.Popen[bytes], port: int, payload: str | None) -> None:
        timeout_s = self.settings.health_timeout_s
        with Endpoint(f"http://{UPSTREAM_HOST}:{port}", timeout_s=10.0) as server:

            def ready() -> bool:
                if proc.poll() is not None:
                    raise DeployError(f"the server exited with code {proc.returncode}")
                return server.ping()

            if not wait_for(ready, timeout_s, 0.25):
                raise DeployError(f"no healthy /ping within {timeout_s:.0f}s")
            if payload is None:
                return
            try:
                resp = server.invoke(payload)
            except EndpointUnreachable as exc:
                raise DeployError(f"smoke request failed: {exc}") from None
            if resp.status_code != 200:
                raise DeployError(
                    f"smoke request with the input example returned {resp.status_code}: "
                    f"{resp.text[:500]}"
                )

    def smoke_payload(self, model_uri: str, input_example: Any) -> str | None:
        from mlflow.models import convert_input_example_to_serving_input

        if input_example is None:
            input_example = self.load_input_example(model_uri)
        if input_example is None:
            log.warning("%s has no input example: readiness is judged by /ping only", model_uri)
            return None
        return convert_input_example_to_serving_input(input_example)

    def load_input_example(self, model_uri: str) -> Any:
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


def child_env(settings: DeploySettings, state_dir: Path) -> dict[str, str]:
    """The environment of the target's children (the proxy, the slot servers)."""
    env = dict(os.environ)
    # Model servers and MLflow helpers look for tools (uvicorn) on PATH: this interpreter's.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    # The proxy child reads DeploySettings from the environment: hand it ours.
    s = settings
    env["PIPELINE_DEPLOY_LOCAL_HOST"] = s.local_host
    env["PIPELINE_DEPLOY_LOCAL_PORT"] = str(s.local_port)
    env["PIPELINE_DEPLOY_LOCAL_SLOT_PORTS"] = ",".join(map(str, s.local_slot_ports))
    env["PIPELINE_DEPLOY_LOCAL_STATE_DIR"] = str(state_dir)
    return env


def ping(port: int, host: str = UPSTREAM_HOST) -> bool:
    with Endpoint(f"http://{host}:{port}", timeout_s=2.0) as endpoint:
        return endpoint.ping()


__all__ = ["PROJECT_ROOT", "SERVER_MODULE", "DeployError", "Slots", "child_env", "ping"]
