"""The distributed tier: the object store (MinIO, scripts/stacklib/objectstore.py) and the
CeleryExecutor shape (scripts/stacklib/distributed.py) as ``PIPELINE_EXECUTOR=celery make run``
starts them.

Where they cannot start (no object-store binary: ``make objectstore-tools``; not root, no
network namespaces, no Redis or worker users: ``scripts/install_distributed.sh``) every test
that needs them is skipped with that reason, which ``pytest -ra`` folds into one SKIPPED line.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import free_port

CANNOT_START = "the distributed tier cannot start here"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Every skip of the tier reported at one place, so that `pytest -ra` folds them."""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and CANNOT_START in report.longrepr[2]:
        gate = skip_unless.__code__
        report.longrepr = (gate.co_filename, gate.co_firstlineno, report.longrepr[2])
    return report


def skip_unless(reason: str | None) -> None:
    if reason is not None:
        pytest.skip(f"{CANNOT_START}: {reason}")


def _tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


@pytest.fixture(scope="session")
def object_store() -> Iterator:
    """A running MinIO with the bucket ``pipeline``; removed at the end."""
    from scripts.stacklib import gobuild, objectstore

    try:
        objectstore.binary()
    except gobuild.Unavailable as exc:
        skip_unless(f"object store: {exc}")
    root = Path(tempfile.mkdtemp(prefix="pipeline-objectstore-test-"))
    store = objectstore.ObjectStore(root, free_port())
    proc = store.start(root / "minio.log")
    try:
        deadline = time.monotonic() + 60
        while not store.ready():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"MinIO did not start:\n{_tail(root / 'minio.log')}")
            time.sleep(0.2)
        store.ensure_bucket("pipeline")
        yield store
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def s3_env(object_store, monkeypatch):
    """The object store's credentials and endpoint in this process's environment, as a task
    gets them from the ``aws_default`` Connection."""
    from s3fs import S3FileSystem

    for key, value in object_store.client_env().items():
        monkeypatch.setenv(key, value)
    S3FileSystem.clear_instance_cache()  # an instance made with other credentials
    yield object_store
    S3FileSystem.clear_instance_cache()
