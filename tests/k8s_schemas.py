"""The Kubernetes versions manifests and pod specs are validated against (offline schemas)."""

from __future__ import annotations

from kubernetes_validate.utils import all_versions, major_minor
from packaging.version import Version


def newest_minors(n: int = 3) -> list[str]:
    """The ``n`` newest Kubernetes minor versions kubernetes_validate ships schemas for."""
    minors = {major_minor(v) for v in all_versions()}
    return sorted(minors, key=Version)[-n:]
