"""Container tier: the real MLflow server fixture from the integration tier, and the marker."""

from __future__ import annotations

from tests.integration.conftest import mlflow_server  # noqa: F401 - a fixture, used by name


def pytest_configure(config):
    # Also declared in pyproject.toml; registering it here keeps --strict-markers happy either way.
    config.addinivalue_line(
        "markers", "container: builds the container images with podman and runs them"
    )
