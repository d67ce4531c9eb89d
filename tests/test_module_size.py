"""Modules a reader can hold in their head: no Python file over 600 lines, tests and benchmark
scripts included (the house rule; the model server's own modules keep the same bound in
tests/serving/server/test_package.py). A file that grows past it is split by what it does, as
dags/_support.py, scripts/stack.py and scripts/bench_serving.py were."""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 600


def test_no_python_file_is_longer_than_the_limit():
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(tracked) > 100, "git ls-files found too few files to judge"
    long = {p: n for p in tracked if (n := len((REPO / p).read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"over {MAX_LINES} lines: {long}"
