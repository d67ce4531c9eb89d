"""Modules a reader can hold in their head: no source file over 700 lines.

The benchmark scripts (scripts/bench_*) are exempt: each is one measurement, read top to
bottom. The model server keeps a tighter 600 (tests/serving/server/test_package.py).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 700


def test_no_source_file_is_longer_than_the_limit():
    tracked = subprocess.run(
        ["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.split()
    sources = [p for p in tracked if not p.startswith(("tests/", "scripts/bench_"))]
    assert len(sources) > 50, "git ls-files found too few files to judge"
    long = {p: n for p in sources if (n := len((REPO / p).read_text().splitlines())) > MAX_LINES}
    assert long == {}, f"over {MAX_LINES} lines: {long}"
