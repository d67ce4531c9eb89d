"""Container tier: podman helpers, the base-image gate, and the real MLflow server fixture.

Where this machine cannot run containers at all (podman missing, no base image can be made,
`podman run` fails), every container test is skipped from :func:`container_base`, with one
reason, which `pytest -ra` shows as one SKIPPED line. A failing image build is a failure.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration.conftest import mlflow_server  # noqa: F401 - a fixture, used by name

REPO = Path(__file__).resolve().parents[2]
BUILD = REPO / "scripts" / "build_images.sh"
# Same default as scripts/build_images.sh (which reads the same variable).
PODMAN = os.environ.get("PODMAN", "podman --runtime runc").split()


def pytest_configure(config):
    # Also declared in pyproject.toml; registering it here keeps --strict-markers happy either way.
    config.addinivalue_line(
        "markers", "container: builds the container images with podman and runs them"
    )


def tail(text: str, lines: int = 30) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def _last_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stderr + proc.stdout).strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else f"exit code {proc.returncode}"


def _run(cmd: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, check=False, **kwargs
    )


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return _run([*PODMAN, *args], timeout=timeout)


CANNOT_RUN = "cannot run containers here"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Report every container test skipped for the same reason at one place, so that
    `pytest -ra` folds them into one SKIPPED line (it folds by location and reason)."""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and CANNOT_RUN in report.longrepr[2]:
        gate = _base_image_or_skip.__code__
        report.longrepr = (gate.co_filename, gate.co_firstlineno, report.longrepr[2])
    return report


# Session scope: pytest sets up wider-scoped fixtures first, and this one must run (and skip,
# where it has to) before the MLflow server is started for nothing.
@pytest.fixture(scope="session")
def container_base() -> str:
    """The locally made base image; skips (one reason) where containers cannot run."""
    return _base_image_or_skip()


def _base_image_or_skip() -> str:
    missing = [tool for tool in (PODMAN[0], "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.skip(
            f"{CANNOT_RUN}: {', '.join(missing)} not installed "
            "(scripts/install_container_tools.sh installs them)"
        )
    started = time.monotonic()
    base = _run(["bash", str(BUILD), "base"], timeout=900)
    if base.returncode != 0:
        pytest.skip(f"{CANNOT_RUN}: no base image could be made: {_last_line(base)}")
    base_image = base.stdout.strip().splitlines()[-1]
    print(f"base image ready in {time.monotonic() - started:.1f}s: {base_image}")
    probe = podman(
        "run", "--rm", "--network", "host", "--read-only", base_image, "/bin/true", timeout=120
    )
    if probe.returncode != 0:
        pytest.skip(f"{CANNOT_RUN}: podman run failed: {_last_line(probe)}")
    return base_image


def build_image(which: str, tag: str) -> str:
    """Build ``which`` (serving|pipeline) with scripts/build_images.sh; a failure fails."""
    started = time.monotonic()
    build = _run(["bash", str(BUILD), which], timeout=1800)
    assert build.returncode == 0, f"{which} image build failed:\n{tail(build.stderr, 60)}"
    print(f"{which} image built in {time.monotonic() - started:.1f}s:\n{tail(build.stderr, 5)}")
    return tag


def run_server_like_a_pod(
    image: str, name: str, port: int, model_uri: str, tracking_uri: str
) -> subprocess.CompletedProcess:
    """``podman run --detach`` a serving image as the Deployment runs it: read-only root
    (writes go to the /tmp tmpfs), no capabilities, no privilege gain. Host network: the
    container reaches the loopback MLflow server and listens on 127.0.0.1:``port`` only (the
    --host/--port arguments override the image's defaults)."""
    podman("rm", "--force", "--ignore", name)
    return podman(
        "run",
        "--detach",
        "--name",
        name,
        "--read-only",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--network",
        "host",
        "--env",
        f"SERVING_MODEL_URI={model_uri}",
        "--env",
        f"MLFLOW_TRACKING_URI={tracking_uri}",
        image,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    )
