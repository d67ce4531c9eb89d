"""promtool for the alert-rule and dashboard tests: one SKIPPED reason where it is missing."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]


NO_PROMTOOL = (
    "promtool not installed: `make prometheus-tools` (scripts/install_prometheus.sh, "
    "Debian's prometheus package) installs it"
)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Report every test skipped for want of promtool at one place, so that `pytest -ra`
    folds them into one SKIPPED line (it folds by location and reason)."""
    report = yield
    if report.skipped and isinstance(report.longrepr, tuple) and NO_PROMTOOL in report.longrepr[2]:
        gate = _promtool_or_skip.__code__
        report.longrepr = (gate.co_filename, gate.co_firstlineno, report.longrepr[2])
    return report


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of ``promtool`` (Debian's prometheus package); skips where it is not installed."""
    return _promtool_or_skip()


def _promtool_or_skip() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip(NO_PROMTOOL)
    return path


def run_promtool(promtool: str, *args: str | Path) -> subprocess.CompletedProcess:
    """``promtool *args`` from the repository root; output in ``.stdout`` (stderr merged)."""
    return subprocess.run(
        [promtool, *map(str, args)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=60,
        check=False,
    )


def derive_rule_tests(source: Path, cases: Path, folder: Path) -> tuple[Path, Path]:
    """In ``folder``: the plain rule file the local stack derives from the PrometheusRule
    ``source`` (scripts/stacklib/prometheus.py), and the promtool cases of ``cases`` pointed
    at it. Returns both paths."""
    import yaml

    from scripts.stacklib.prometheus import rules_yaml

    rules, tests = folder / cases.name.replace(".test", ""), folder / cases.name
    rules.write_text(rules_yaml(source))
    loaded = yaml.safe_load(cases.read_text()) | {"rule_files": [str(rules)]}
    tests.write_text(yaml.safe_dump(loaded, sort_keys=False))
    return rules, tests
