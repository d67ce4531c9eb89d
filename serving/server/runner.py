"""Running the app under uvicorn: one process, or ``--workers N`` processes behind one port.

One worker: the app runs in this process, and a model that cannot be served stops it (exit code
1). Several: uvicorn's supervisor starts each worker, which builds its own app from the settings
in ``$SERVING_SERVER_CONFIG`` (:func:`app_from_env`) and keeps its metrics in files of a shared
directory (``prometheus_client``'s multiprocess mode); a worker that cannot serve stops and is
restarted. SIGTERM/SIGINT drain in-flight requests first.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import signal
import tempfile
from typing import Any

from serving.server.app import ScoringApp
from serving.server.config import CONFIG_ENV, ServerConfig
from serving.server.logs import configure_logging
from serving.server.metrics import MULTIPROCESS_DIR_ENV, clear_directory

log = logging.getLogger("serving.server")


def uvicorn_options() -> dict[str, Any]:
    """uvloop and httptools where they are installed."""
    return {
        "loop": "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "http": "httptools" if importlib.util.find_spec("httptools") else "h11",
    }


def app_from_env() -> ScoringApp:
    """Factory for ``--workers N`` (each uvicorn worker process builds its own app)."""
    config = ServerConfig.from_json(os.environ[CONFIG_ENV])
    configure_logging(config.log_level)

    def fatal() -> None:  # a worker that cannot serve stops; uvicorn's supervisor restarts it
        os.kill(os.getpid(), signal.SIGTERM)

    return ScoringApp(config, on_fatal=fatal, metrics_dir=os.environ.get(MULTIPROCESS_DIR_ENV))


def _after_shutdown_signal(signum: int, frame: Any) -> None:
    log.info("stopped on signal %s", signal.Signals(signum).name)


def run(config: ServerConfig) -> int:
    """Serve until SIGINT/SIGTERM; in-flight requests finish first. Returns the exit code."""
    import uvicorn

    configure_logging(config.log_level)
    common = {
        "host": config.host,
        "port": config.port,
        "lifespan": "on",
        "log_config": None,
        "access_log": False,
        "timeout_graceful_shutdown": max(1, math.ceil(config.graceful_timeout_s)),
        **uvicorn_options(),
    }
    log.info(
        "starting model server on http://%s:%s for %s (workers=%s, %s)",
        config.host,
        config.port,
        config.model_uri,
        config.workers,
        common["http"] + "/" + common["loop"],
    )
    # prometheus_client's multiprocess mode (see serving.server.metrics): every worker keeps its
    # metrics in files in one directory, and any worker's /metrics answers for all of them:
    # $PROMETHEUS_MULTIPROC_DIR (emptied of old files first) or a temporary directory, removed
    # at exit. The variable must be set before the workers import prometheus_client.
    given = os.environ.get(MULTIPROCESS_DIR_ENV)
    if given:
        os.makedirs(given, exist_ok=True)
        clear_directory(given)
    if config.workers > 1:
        metrics_dir = given or tempfile.mkdtemp(prefix="model-server-metrics-")
        os.environ[CONFIG_ENV] = config.to_json()
        os.environ[MULTIPROCESS_DIR_ENV] = metrics_dir
        try:
            uvicorn.run(
                "serving.server.runner:app_from_env",
                factory=True,
                workers=config.workers,
                **common,
            )
        finally:
            if not given:
                shutil.rmtree(metrics_dir, ignore_errors=True)
        return 0
    app = ScoringApp(config, metrics_dir=given)  # $PROMETHEUS_MULTIPROC_DIR set: files there
    server = uvicorn.Server(uvicorn.Config(app, **common))

    def fatal() -> None:
        server.should_exit = True

    app.on_fatal = fatal
    # uvicorn drains, restores the previous handlers and re-raises the signal it caught, so
    # that the default action kills the process (exit status -15). With these no-op handlers
    # in place, a graceful SIGTERM/SIGINT shutdown ends with exit code 0 instead.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _after_shutdown_signal)
    server.run()
    if app.exit_code == 0 and not server.started:
        return 1
    return app.exit_code
