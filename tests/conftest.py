"""Shared fixtures. Heavy imports stay inside fixtures so collecting tests stays fast."""

from __future__ import annotations

import os

import pytest

# Quiet TensorFlow's C++ logging and keep runs reproducible across machines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
# MLflow's HTTP client retries ~7 times with backoff by default: fail fast in tests.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A real MLflow tracking + registry store (SQLite) with artifacts in a temp folder.

    Returns the tracking URI; MLFLOW_TRACKING_URI is set to it for the test.
    """
    import mlflow

    monkeypatch.chdir(tmp_path)  # the SQLite store puts default artifacts under ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)
