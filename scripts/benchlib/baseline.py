"""The server as of an earlier git revision, measured alongside (``--baseline REV``)."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def baseline_tree(rev: str, workdir: Path) -> tuple[str, Path]:
    """The ``serving`` package as of git revision ``rev``, extracted under ``workdir``."""
    import io
    import tarfile

    short = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", rev],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    archive = subprocess.run(
        ["git", "-C", str(REPO), "archive", "--format=tar", short, "serving"],
        capture_output=True, check=True,
    ).stdout  # fmt: skip
    tree = workdir / f"baseline-{short}"
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    return short, tree
